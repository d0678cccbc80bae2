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
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch
import pyarrow.fs as pafs
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from raypt import storage

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
        for key in (None, *MOMENTS) if param.requires_grad else (None,):  # frozen ones have no Adam state
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


def read_state(uri: str) -> tuple[TrainState, dict]:
    """Trust only a committed, complete checkpoint: state file present and every listed file at its size."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_stream(f"{path}/{STATE}") as f:
            body = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        raise CheckpointError(f"{uri}: no readable {STATE}; the checkpoint was never committed") from None
    names = list(body["files"])
    infos = fs.get_file_info([f"{path}/{n}" for n in names])
    for name, info in zip(names, infos):
        if info.size != body["files"][name]:
            found = "missing" if info.size is None else f"{info.size} bytes"
            raise CheckpointError(f"{uri}: {name} is {found}, committed as {body['files'][name]} bytes")
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in body.items() if k in fields}), body


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint folders of a run, oldest first."""
    fs, path = storage.resolve(run_uri)
    selector = pafs.FileSelector(path, allow_not_found=True)
    steps = sorted(i.base_name for i in fs.get_file_info(selector)
                   if i.type == pafs.FileType.Directory and re.fullmatch(r"step\d+", i.base_name))
    return [storage.join(run_uri, s) for s in steps]


def latest_good(run_uri: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest checkpoint that verifies; each one skipped is logged with the reason."""
    for uri in reversed(list_checkpoints(run_uri)):
        try:
            read_state(uri)
            return uri
        except CheckpointError as e:
            log(f"skipping checkpoint: {e}; falling back to the previous one")
    return None


def prune(run_uri: str, keep: int, log: Callable[[str], None] = print) -> None:
    """Keep the newest `keep` good checkpoints and whatever is newer (uploads may be in flight); never the only
    good one is deleted, because deletion only reaches below the oldest kept good checkpoint."""
    folders = list_checkpoints(run_uri)
    good = []
    for uri in reversed(folders):
        try:
            read_state(uri)
            good.append(uri)
        except CheckpointError:
            pass
        if len(good) == keep:
            break
    if len(good) < keep:
        return
    fs, _ = storage.resolve(run_uri)
    for uri in folders[:folders.index(good[-1])]:
        fs.delete_dir(storage.resolve(uri)[1])
        log(f"deleted old checkpoint {uri.rsplit('/', 1)[-1]}")


class Uploader:
    """Moves a rank's checkpoint part into the run's storage on one background thread, so training goes on.

    Ray's checkpoint registry is not used: its keep-K cannot know which checkpoints verify, and it refuses to
    resume a run whose registered checkpoints were pruned. raypt's state file is the registry.
    """

    def __init__(self, run_uri: str, keep: int, prunes: bool):
        self.run_uri, self.keep, self.prunes = run_uri, keep, prunes
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypt-upload")
        self.pending: Optional[Future] = None

    def submit(self, local: str, step: int) -> None:
        self.wait()  # one upload in flight: checkpoints land in step order
        self.pending = self.pool.submit(self._upload, local, step)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def _upload(self, local: str, step: int) -> None:
        fs, path = storage.resolve(storage.join(self.run_uri, f"step{step:06d}"))
        fs.create_dir(path, recursive=True)
        local_fs = pafs.LocalFileSystem()
        for name in sorted(os.listdir(local), key=lambda n: n == STATE):  # the state file lands last
            pafs.copy_files(os.path.join(local, name), f"{path}/{name}", source_filesystem=local_fs,
                            destination_filesystem=fs)
        shutil.rmtree(local, ignore_errors=True)
        if self.prunes:
            prune(self.run_uri, self.keep, log=lambda m: None)


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder holding the checkpoint: the folder itself when local, a downloaded copy otherwise."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="raypt-restore-") as tmp:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp


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
            if not param.requires_grad:
                continue
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
