"""`run.init_from`: a new run that starts from another model's weights (a raypt checkpoint or a Hugging Face
folder), seen by the engine and the hooks as a checkpoint whose counters are all 0.

The engine loads the weights (and Adam's state with `optimizer: keep`) by parameter name, as on any restore; the
step, token and sample counters, the data position and every hook's state start fresh, so the new run's schedule,
data mix and length are its own. Shapes are checked by name before anything is loaded (`check_shapes`).
"""
from __future__ import annotations

import glob
import os
from typing import Callable, Optional

import torch
from safetensors import SafetensorError, safe_open

from raypt.checkpoint.index import STATE, CheckpointError, Reader, TrainState

Shapes = dict[str, tuple[int, ...]]


class HFFolder:
    """A Hugging Face model folder's safetensors, by tensor name (the names `save_pretrained` writes are the
    parameter names of the model raypt builds for the task). Pickled `.bin` weights are not read: loading them
    runs code."""

    def __init__(self, directory: str, origin: Optional[str] = None):
        self.directory, self.origin = directory, origin or directory
        self.files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
        if not self.files:
            raise CheckpointError(f"{self.origin}: neither a raypt checkpoint ({STATE}) nor a Hugging Face folder "
                                  "with .safetensors weights (pickled .bin weights are not loaded)")

    def shapes(self) -> Shapes:
        out: Shapes = {}
        for path in self.files:
            try:
                with safe_open(path, "pt") as f:
                    out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.origin}/{os.path.basename(path)} is unreadable: {e}") from None
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path in self.files:
            with safe_open(path, "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out


def is_checkpoint(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, STATE))


def checkpoint_shapes(body: dict) -> Optional[Shapes]:
    """Parameter shapes from a checkpoint index (format 2); None for format 1, which lists none."""
    tensors = body.get("tensors") or {}
    if body.get("format", 1) < 2:
        return None
    return {k[len("param/"):]: tuple(v["shape"]) for k, v in tensors.items() if k.startswith("param/")}


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

    def __init__(self, params: Callable[[], dict[str, torch.Tensor]], origin: str,
                 optimizer: Optional[Reader] = None):
        self._params, self.origin, self._optimizer = params, origin, optimizer
        self.state = TrainState()

    @property
    def holds_optimizer(self) -> bool:
        return self._optimizer is not None

    @property
    def optimizer_steps(self) -> int:
        return self._optimizer.optimizer_steps if self._optimizer else 0

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        if prefix == "param":
            return self._params()
        return self._optimizer.tensors(prefix) if self._optimizer else {}

    def hook_tensors(self, hook: str) -> dict[str, torch.Tensor]:
        return {}


def initial(directory: str, origin: str, optimizer: str) -> Initial:
    """run.init_from's source in a local folder: a raypt checkpoint (verified) or a Hugging Face folder."""
    if is_checkpoint(directory):
        reader = Reader(directory, origin=origin)
        reader.verify()
        return Initial(lambda: reader.tensors("param"), origin, reader if optimizer == "keep" else None)
    folder = HFFolder(directory, origin)
    if optimizer == "keep":
        raise CheckpointError(f"run.init_from.optimizer: keep, but {origin} is a Hugging Face folder, which holds "
                              "no optimizer state; use optimizer: reset")
    return Initial(folder.tensors, origin)


def holds_checkpoint(uri: str) -> bool:
    """Whether a local or s3:// folder is a raypt checkpoint (has an index), not a Hugging Face folder."""
    import pyarrow.fs as pafs

    from raypt import storage

    fs, path = storage.resolve(uri)
    return fs.get_file_info(f"{path}/{STATE}").type != pafs.FileType.NotFound


def source_shapes(uri: str) -> Optional[Shapes]:
    """The parameter shapes run.init_from holds, read without its weights; None where that would mean downloading
    them (a Hugging Face folder on s3://: the worker checks it) or the index lists none (format 1)."""
    from raypt.checkpoint.index import read_state

    if holds_checkpoint(uri):
        return checkpoint_shapes(read_state(uri)[1])  # a torn checkpoint is refused here
    return None if "://" in uri else HFFolder(uri).shapes()
