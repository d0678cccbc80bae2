"""`run.init_from`: a new run that starts from another model's weights (a raypt checkpoint or a Hugging Face
folder), seen by the engine and the hooks as a checkpoint whose counters are all 0.

The engine loads the weights (and Adam's state with `optimizer: keep`) by parameter name, as on any restore; the
step, token and sample counters, the data position and every hook's state start fresh, so the new run's schedule,
data mix and length are its own. Shapes are checked by name before anything is loaded (`check_shapes`).
"""
from __future__ import annotations

from typing import Optional, Union

import pyarrow.fs as pafs
import torch

from raypt import storage
from raypt.checkpoint.index import PARAM, STATE, CheckpointError, Reader, TrainState
from raypt.checkpoint.tensorfile import TensorFile

Shapes = dict[str, tuple[int, ...]]


class HFFolder:
    """A Hugging Face model folder's safetensors (local or s3://), by tensor name (the names `save_pretrained`
    writes are the parameter names of the model raypt builds for the task), read in ranges like a checkpoint.
    Pickled `.bin` weights are not read: loading them runs code."""

    def __init__(self, uri: str, origin: Optional[str] = None):
        self.origin = origin or uri
        fs, path = storage.resolve(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File
                       and i.base_name.endswith(".safetensors"))
        if not names:
            raise CheckpointError(f"{self.origin}: neither a raypt checkpoint ({STATE}) nor a Hugging Face folder "
                                  "with .safetensors weights (pickled .bin weights are not loaded)")
        self.where: dict[str, TensorFile] = {}
        for name in names:
            try:
                file = TensorFile(fs.open_input_file(f"{path}/{name}"))
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{self.origin}/{name} is unreadable: {e}") from None
            self.where.update(dict.fromkeys(file.entries, file))

    def param_shapes(self) -> Shapes:
        return {k: f.entries[k].shape for k, f in self.where.items()}

    def flat(self, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        name = key.removeprefix(PARAM + "/")
        return self.where[name].flat(name, start, stop, out)


def is_checkpoint(uri: str) -> bool:
    """Whether a local or s3:// folder is a raypt checkpoint (has an index), not a Hugging Face folder."""
    fs, path = storage.resolve(uri)
    return fs.get_file_info(f"{path}/{STATE}").type != pafs.FileType.NotFound


def checkpoint_shapes(body: dict) -> Optional[Shapes]:
    """Parameter shapes from a checkpoint index (format 2); None for format 1, which lists none."""
    tensors = body.get("tensors") or {}
    if body.get("format", 1) < 2:
        return None
    return {k[len("param/"):]: tuple(v["shape"]) for k, v in ((v.get("tensor", k), v) for k, v in tensors.items())
            if k.startswith("param/")}


def check_shapes(expected: Shapes, found: Shapes, origin: str) -> None:
    """Every parameter of the model is in `found` at its shape; the error names both shapes (a vocabulary that
    differs shows as the embedding's first dimension)."""
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        lacks = f"lacks {len(missing)} of the model's {len(expected)} parameters ({', '.join(missing[:3])})"
        more = f"holds {len(extra)} tensors the model has no parameter for ({', '.join(extra[:3])})"
        raise CheckpointError(f"{origin} {' and '.join(w for w, n in ((lacks, missing), (more, extra)) if n)}: a "
                              "model of another architecture or depth (model.*)")
    wrong = [n for n in expected if tuple(found[n]) != tuple(expected[n])]
    if wrong:
        listed = "; ".join(f"{n}: the job's model has {list(expected[n])}, {origin} has {list(found[n])}"
                           for n in wrong[:3])
        raise CheckpointError(f"{len(wrong)} parameter shapes differ ({listed}); the model's sizes (model.*) and "
                              "vocabulary (the data's tokenizer) must match the model it starts from")


def model_shapes(model: torch.nn.Module) -> Shapes:
    """A module's parameter shapes by name, as a checkpoint stores them (ZeRO-3 keeps the full shape aside)."""
    return {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in model.named_parameters()}


class Initial:
    """What `run.init_from` gives the engine and the hooks: a source's weights, Adam's state when kept, and a
    TrainState at 0 (a new run); no hook state (the data position, the loss scale start fresh)."""

    hooks: dict = {}
    trajectory = None

    def __init__(self, source: Union[Reader, HFFolder], origin: str, optimizer: Optional[Reader] = None):
        self.source, self.origin, self._optimizer = source, origin, optimizer
        self.state = TrainState()

    @property
    def holds_optimizer(self) -> bool:
        return self._optimizer is not None

    @property
    def optimizer_steps(self) -> int:
        return self._optimizer.optimizer_steps if self._optimizer else 0

    def param_shapes(self) -> Shapes:
        return self.source.param_shapes()

    def flat(self, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return (self.source if key.startswith(PARAM + "/") else self._optimizer).flat(key, start, stop, out)

    def hook_tensors(self, hook: str) -> dict[str, torch.Tensor]:
        return {}


def initial(uri: str, origin: str, optimizer: str, rank: int = 0, world: int = 1) -> Initial:
    """run.init_from's source: a raypt checkpoint (this rank's share verified) or a Hugging Face folder."""
    if is_checkpoint(uri):
        reader = Reader(uri, origin=origin)
        reader.verify(rank, world)
        return Initial(reader, origin, reader if optimizer == "keep" else None)
    folder = HFFolder(uri, origin)
    if optimizer == "keep":
        raise CheckpointError(f"run.init_from.optimizer: keep, but {origin} is a Hugging Face folder, which holds "
                              "no optimizer state; use optimizer: reset")
    return Initial(folder, origin)


def source_shapes(uri: str) -> Optional[Shapes]:
    """The parameter shapes run.init_from holds, read without its weights (headers only); None where the index
    lists none (format 1)."""
    from raypt.checkpoint.index import read_state

    if is_checkpoint(uri):
        return checkpoint_shapes(read_state(uri)[1])  # a torn checkpoint is refused here
    return HFFolder(uri).param_shapes()
