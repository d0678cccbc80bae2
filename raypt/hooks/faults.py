"""Fault injection for tests and chaos drills: each fault fires once per run, recorded by a marker in storage."""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import torch

from raypt import storage
from raypt.hooks.base import Hook


class InjectedFault(RuntimeError):
    """Raised by `faults.raise_at_step`."""


class Faults(Hook):
    """`faults:` of the job: SIGKILL, SIGTERM or hang a rank before a step, make its loss NaN at a step, raise on
    rank 0, tear a checkpoint. (The read task a fault kills is killed by the feed's task, raypt/data/feed.py.)"""

    def __init__(self, cfg: Any, run_uri: str, rank: int):
        self.cfg, self.run_uri, self.rank = cfg, run_uri, rank
        self.poisoned = None  # the forward hook that makes this step's loss NaN, until the step ends

    def _fire_once(self, name: str, step: int) -> bool:
        return self.cfg.repeat or fire_once(marker(self.run_uri, name),
                                            {"fault": name, "step": step, "rank": self.rank})

    def before_step(self, loop: Any, step: int) -> None:
        c = self.cfg
        if c.kill_at_step == step and self.rank == c.kill_rank and self._fire_once("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if c.sigterm_at_step == step and self.rank == c.kill_rank and self._fire_once("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if c.raise_at_step == step and self.rank == 0 and self._fire_once("raise", step):
            raise InjectedFault(f"faults.raise_at_step: injected failure at step {step}")
        if c.hang_at_step == step and self.rank == c.kill_rank and self._fire_once("hang", step):
            threading.Event().wait()  # nothing ever sets it: only the watchdog or a teardown ends this process
        if c.nan_loss_at_step == step and self.rank == c.kill_rank and self._fire_once("nan", step):
            # On the model's output, so the NaN flows through the loss into every gradient, as a real one would.
            self.poisoned = loop.engine.module.register_forward_hook(lambda module, args, out: nan_output(out))

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if self.poisoned is not None:
            self.poisoned.remove()
            self.poisoned = None

    def save(self, loop: Any, step: int, record: dict) -> None:
        """Tear the checkpoint just written: its shard loses its tail after the sizes were committed."""
        if self.cfg.corrupt_checkpoint_at_step == step and self.rank == 0 and self._fire_once("corrupt", step):
            directory = loop.saving_to
            shard = next(f for f in sorted(os.listdir(directory)) if f.startswith("state-"))
            with open(os.path.join(directory, shard), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 2))


def nan_output(output: Any) -> Any:
    """A model output (a tensor, or a dict such as Hugging Face's ModelOutput) with its float tensors NaN."""
    if isinstance(output, torch.Tensor):
        return output * float("nan") if output.is_floating_point() else output
    if isinstance(output, dict):
        for key, value in list(output.items()):
            if isinstance(value, torch.Tensor):
                output[key] = nan_output(value)
    return output


def marker(run_uri: str, name: str) -> str:
    return storage.join(run_uri, "faults", f"{name}.json")


def fire_once(uri: str, record: dict) -> bool:
    """Write the marker before firing, so the restart (or retry) the fault causes never fires it again: whether
    this is the first time."""
    try:
        storage.read_json(uri)
        return False
    except FileNotFoundError:
        storage.write_json(uri, {**record, "time": time.time()})
        return True


def reader_drill(cfg: Any, run_uri: str) -> dict | None:
    """faults.kill_reader_at_step as the stream's drill (raypt/data/feed.py kills the read task); batch b is
    step b + 1's."""
    if cfg.kill_reader_at_step is None:
        return None
    return {"batch": cfg.kill_reader_at_step - 1, "rank": cfg.kill_rank, "marker": marker(run_uri, "kill_reader")}


def fired(run_uri: str, name: str) -> dict | None:
    """The marker of a fault that fired (step, rank, time), for tests and the recovery benchmark."""
    try:
        return storage.read_json(marker(run_uri, name))
    except FileNotFoundError:
        return None
