"""fp16's dynamic loss scale in the checkpoint. DeepSpeed keeps it outside the optimizer state raypt saves: a
resume that started again from the initial scale (2^16) would overflow and skip updates until the scale had come
back down, so an fp16 run's losses would not continue as if uninterrupted."""
from __future__ import annotations

from typing import Any, Optional

from raypt.hooks.base import Hook

# What changes as the run trains; the scale's settings (factor, window, minimum) come from the config again.
STATE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def scaler(optimizer: Any) -> Optional[Any]:
    """DeepSpeed's loss-scale state of an fp16 optimizer: ZeRO 1-3 keep a `loss_scaler`, the ZeRO-0 fp16 optimizer
    a `loss_scale_config`."""
    return getattr(optimizer, "loss_scaler", None) or getattr(optimizer, "loss_scale_config", None)


def read(obj: Any) -> dict:
    return {k: getattr(obj, k) for k in STATE if hasattr(obj, k)}


def write(obj: Any, state: dict) -> None:
    for k, v in state.items():
        if hasattr(obj, k):
            setattr(obj, k, v)


class LossScale(Hook):
    """Saved and restored only by fp16 runs (every rank's scale is the same: DeepSpeed all-reduces overflows)."""

    name = "loss_scale"

    def __init__(self) -> None:
        self.saved: Optional[dict] = None
        self.obj: Optional[Any] = None

    def restore(self, tensors: dict, state: dict) -> None:
        self.saved = state

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        ds = getattr(loop.engine, "ds", None)
        if ds is None or not ds.fp16_enabled():
            return
        self.obj = scaler(ds.optimizer)
        if self.obj is not None and self.saved:
            write(self.obj, self.saved)

    def state(self) -> Optional[tuple[dict, dict]]:
        if self.obj is None:
            return None
        return {}, {k: float(v) if k == "cur_scale" else v for k, v in read(self.obj).items()}
