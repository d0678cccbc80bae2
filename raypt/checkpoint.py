"""World-size-independent checkpoints: full fp32 tensors per parameter, spread over ranks, in safetensors.

Every rank joins the gathers (ZeRO-3 and ZeRO-1/2 fragments need them) and writes the parameters it owns
(index % world == rank). Any world size can load the result: weights go into the bare model before
`deepspeed.initialize`, Adam moments into whatever partition each rank then holds. The state file, written by
rank 0 after all ranks have written, lists every file and its size; a checkpoint without it is not resumable.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE = "raypt_state.json"
MOMENTS = ("exp_avg", "exp_avg_sq")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing files or sizes that differ from the committed list."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    world_size: int = 0
    config_digest: str = ""


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _link_optimizer_state(engine) -> None:
    """(Re)link ZeRO-1/2 and bf16 fragments to Adam's state: DeepSpeed links once, after the first group's
    step, so later param groups (our no-decay group) and state we create on restore stay unlinked."""
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _full(param: torch.nn.Parameter, key: str | None, base: torch.optim.Optimizer) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # ZeRO-0 in fp32: the optimizer works on the module's own tensors
        value = param.data if key is None else base.state[param][key]
    return value.detach().float().cpu().contiguous()


def save(engine, directory: str, state: TrainState) -> None:
    """Collective: every rank calls it with its own local directory."""
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(directory, exist_ok=True)
    base = _base_optimizer(engine)
    _link_optimizer_state(engine)
    mine: dict[str, torch.Tensor] = {}
    for i, (name, param) in enumerate(engine.module.named_parameters()):
        for key in (None, *MOMENTS):
            value = _full(param, key, base)
            if i % world == rank:
                mine[f"{key or 'param'}/{name}"] = value
    shard = f"state-{rank:05d}-of-{world:05d}.safetensors"
    save_file(mine, os.path.join(directory, shard))
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, os.path.join(directory, f"rng-{rank:05d}.safetensors"))
    written = {f: os.path.getsize(os.path.join(directory, f)) for f in (shard, f"rng-{rank:05d}.safetensors")}
    every: list = [None] * world
    dist.all_gather_object(every, written)
    if rank == 0:
        files = {k: v for part in every for k, v in part.items()}
        body = {**asdict(state), "optimizer_step": _optimizer_step(base), "files": files}
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(body, f, indent=1)


def _optimizer_step(base: torch.optim.Optimizer) -> int:
    for s in base.state.values():
        if "step" in s:
            return int(s["step"])
    return 0


def read_state(directory: str) -> tuple[TrainState, dict]:
    """Trust only a committed, complete checkpoint: state file present and every listed file at its size."""
    path = os.path.join(directory, STATE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no {STATE}; the checkpoint was not committed")
    with open(path) as f:
        body = json.load(f)
    for name, size in body["files"].items():
        p = os.path.join(directory, name)
        if not os.path.isfile(p) or os.path.getsize(p) != size:
            raise CheckpointError(f"{directory}: {name} is missing or not {size} bytes")
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in body.items() if k in fields}), body


def _tensors(directory: str, kind: str) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(glob.glob(os.path.join(directory, "state-*.safetensors"))):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                if key.startswith(kind + "/"):
                    out[key[len(kind) + 1:]] = f.get_tensor(key)
    return out


def load_weights(model: torch.nn.Module, directory: str) -> None:
    """Before `deepspeed.initialize`, so ZeRO builds its fp32 master copy from these weights."""
    model.load_state_dict(_tensors(directory, "param"), strict=True)


def _adam_keys(engine) -> list[torch.Tensor]:
    """The tensors Adam keys its state on: ZeRO's flat fp32 partitions, or the module's own parameters."""
    opt = engine.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def load_optimizer(engine, directory: str, body: dict) -> None:
    from deepspeed.utils import safe_set_full_optimizer_state

    base = _base_optimizer(engine)
    step = body["optimizer_step"]
    fused = any(g.get("fused") for g in base.param_groups)
    for flat in _adam_keys(engine):  # Adam creates its state lazily; give it one to write into
        if not base.state.get(flat):
            base.state[flat] = {
                "step": torch.tensor(float(step), device=flat.device if fused else "cpu")
                if isinstance(base, torch.optim.AdamW) else step,
                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
    _link_optimizer_state(engine)
    for key in MOMENTS:
        full = _tensors(directory, key)
        for name, param in engine.module.named_parameters():
            if getattr(param, "ds_id", None) is None and not hasattr(param, "_hp_mapping"):
                base.state[param][key].copy_(full[name])
            else:
                safe_set_full_optimizer_state(param, full[name].to(engine.device), key)


def restore_rng(directory: str, rank: int) -> None:
    path = os.path.join(directory, f"rng-{rank:05d}.safetensors")
    if os.path.isfile(path):
        rng = load_file(path)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
