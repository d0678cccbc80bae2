"""Writing a checkpoint: every rank writes the tensors it owns, rank 0 writes the index last.

Collective: the engine's gathers need every rank. Each file's bytes are checksummed as they are written (CRC-32
of the serialized safetensors), and each tensor's bytes too, so a reader can verify what it reads alone.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save

from raypt.checkpoint.index import FORMAT, STATE, TrainState

HookStates = dict  # hook name -> (dict of full tensors, JSON-able dict)


def crc32(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy())


def _write(directory: str, name: str, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """One safetensors file: its entry (size, CRC-32) and one entry per tensor."""
    data = save(tensors)
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)
    entries = {k: {"file": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                   "slice": None, "crc32": crc32(t)} for k, t in tensors.items()}
    return {name: {"size": len(data), "crc32": zlib.crc32(data)}}, entries


def save_checkpoint(engine: Any, directory: str, state: TrainState, hooks: HookStates, config: dict,
                    trajectory: dict) -> None:
    """Every rank calls it with its own local directory; rank 0's also receives the index. `engine`: any
    `raypt.engines.base.Engine` (its `state_tensors` and `optimizer_steps`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(directory, exist_ok=True)
    mine = {key: value for key, owner, value in engine.state_tensors() if owner == rank}
    extra = [(f"hook/{h}/{n}", t) for h in sorted(hooks) for n, t in sorted(hooks[h][0].items())]
    for j, (key, tensor) in enumerate(extra):  # hook tensors are full on every rank: spread them too
        if j % world == rank:
            mine[key] = tensor.detach().cpu().contiguous()
    files, tensors = _write(directory, f"state-{rank:05d}-of-{world:05d}.safetensors", mine)
    every: list = [None] * world
    dist.all_gather_object(every, (files, tensors))
    if rank == 0:
        body = {"format": FORMAT, **asdict(state), "optimizer_step": engine.optimizer_steps(),
                "files": {k: v for part, _ in every for k, v in part.items()},
                "tensors": {k: v for _, part in every for k, v in part.items()},
                "hooks": {h: hooks[h][1] for h in sorted(hooks)}, "trajectory": trajectory, "config": config}
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(body, f, indent=1)
