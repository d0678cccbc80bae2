"""Writing a checkpoint: every rank writes what it holds, rank 0 writes the index last.

Each rank writes its own slices of the fp32 masters and Adam's moments, as the engine keeps them (`Engine.shards`):
no parameter is gathered, so a rank's memory and traffic are its share of the state plus one tensor's copy off
the device. State every rank holds whole (ZeRO-0's parameters, hook tensors) is spread over the ranks instead.
Collective only in the exchange of what each rank wrote. Each file's bytes and each tensor's are checksummed as
they are written (CRC-32), so a reader can verify what it reads alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Iterator

import torch
import torch.distributed as dist

from raypt.checkpoint.index import FORMAT, MOMENTS, PARAM, STATE, TrainState
from raypt.checkpoint.tensorfile import CODES, write

HookStates = dict  # hook name -> (dict of full tensors, JSON-able dict)
Piece = tuple[str, tuple[int, ...], int, torch.Tensor]  # key, full shape, flat start, flat tensor


def own_pieces(engine: Any) -> Iterator[Piece]:
    """This rank's share of every parameter's state: its slices where the engine splits the masters, else
    parameter i whole on data-parallel rank i % dp_size (of the stage that holds it). Frozen parameters have no
    moments. Before Adam's first step the moments are its zeros (one element broadcast, made whole only as it is
    written)."""
    for i, shard in enumerate(engine.shards()):
        if not shard.master.numel() or shard.copy or (shard.replicated and i % engine.dp_size != engine.dp_rank):
            continue
        if not shard.trainable:  # frozen: its weights alone, in fp32 as every parameter is stored
            yield f"{PARAM}/{shard.name}", shard.shape, shard.start, shard.master.float()
            continue
        zeros = torch.zeros(1, dtype=shard.master.dtype).expand(shard.master.numel())
        moments = shard.moments or (zeros,) * len(MOMENTS)
        for kind, tensor in zip((PARAM, *MOMENTS), (shard.master, *moments)):
            yield f"{kind}/{shard.name}", shard.shape, shard.start, tensor


def own_share(engine: Any, hooks: HookStates, rank: int, world: int) -> tuple[dict, list[tuple[str, torch.Tensor]]]:
    """This rank's index entries (file, dtype and CRC-32 still to fill in) and its tensors, in the order written."""
    entries, stored = {}, []
    for key, shape, start, tensor in own_pieces(engine):
        whole = start == 0 and tensor.numel() == torch.Size(shape).numel()
        name = key if whole else f"{key}[{start}:{start + tensor.numel()}]"
        entries[name] = {"shape": list(shape), "slice": None if whole else [start, start + tensor.numel()],
                         **({} if whole else {"tensor": key})}
        stored.append((name, tensor.reshape(shape) if whole else tensor))
    extra = [(f"hook/{h}/{n}", t) for h in sorted(hooks) for n, t in sorted(hooks[h][0].items())]
    for j, (key, tensor) in enumerate(extra):  # hook tensors are full on every rank: spread them too
        if j % world == rank:
            entries[key] = {"shape": list(tensor.shape), "slice": None}
            stored.append((key, tensor))
    return entries, stored


def file_name(rank: int, world: int) -> str:
    return f"state-{rank:05d}-of-{world:05d}.safetensors"


def index_body(engine: Any, state: TrainState, hooks: HookStates, config: dict, trajectory: dict) -> dict:
    """The index less its `files` and `tensors`, which every rank's share adds."""
    return {"format": FORMAT, **asdict(state), "optimizer_step": engine.optimizer_steps(),
            "hooks": {h: hooks[h][1] for h in sorted(hooks)}, "trajectory": trajectory, "config": config}


def save_checkpoint(engine: Any, directory: str, state: TrainState, hooks: HookStates, config: dict,
                    trajectory: dict) -> None:
    """Every rank calls it with its own local directory; rank 0's also receives the index. `engine`: any
    `raypt.engines.base.Engine` (its `shards` and `optimizer_steps`)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(directory, exist_ok=True)
    entries, stored = own_share(engine, hooks, rank, world)
    name = file_name(rank, world)
    size, crc, crcs = write(os.path.join(directory, name), stored)
    for key, tensor in stored:
        entries[key].update(file=name, dtype=CODES[tensor.dtype], crc32=crcs[key])
    every: list = [None] * world
    dist.all_gather_object(every, ({name: {"size": size, "crc32": crc}}, entries))
    if rank == 0:
        body = {**index_body(engine, state, hooks, config, trajectory),
                "files": {k: v for part, _ in every for k, v in part.items()},
                "tensors": {k: v for _, part in every for k, v in part.items()}}
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(body, f, indent=1)
