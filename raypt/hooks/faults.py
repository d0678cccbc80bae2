"""Fault injection for tests and chaos drills: each fault fires once per run, recorded by a marker in storage."""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from raypt import storage
from raypt.hooks.base import Hook


class InjectedFault(RuntimeError):
    """Raised by `faults.raise_at_step`."""


class Faults(Hook):
    """`faults:` of the job: SIGKILL or SIGTERM a rank before a step, raise on rank 0, tear a checkpoint."""

    def __init__(self, cfg: Any, run_uri: str, rank: int):
        self.cfg, self.run_uri, self.rank = cfg, run_uri, rank

    def _fire_once(self, name: str, step: int) -> bool:
        """Write the marker before firing, so the restart the fault causes never fires it again (unless the drill
        repeats on every attempt)."""
        if self.cfg.repeat:
            return True
        marker = storage.join(self.run_uri, "faults", f"{name}.json")
        try:
            storage.read_json(marker)
            return False
        except FileNotFoundError:
            storage.write_json(marker, {"fault": name, "step": step, "rank": self.rank, "time": time.time()})
            return True

    def before_step(self, loop: Any, step: int) -> None:
        c = self.cfg
        if c.kill_at_step == step and self.rank == c.kill_rank and self._fire_once("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if c.sigterm_at_step == step and self.rank == c.kill_rank and self._fire_once("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        if c.raise_at_step == step and self.rank == 0 and self._fire_once("raise", step):
            raise InjectedFault(f"faults.raise_at_step: injected failure at step {step}")

    def save(self, loop: Any, step: int, record: dict) -> None:
        """Tear the checkpoint just written: its shard loses its tail after the sizes were committed."""
        if self.cfg.corrupt_checkpoint_at_step == step and self.rank == 0 and self._fire_once("corrupt", step):
            directory = loop.saving_to
            shard = next(f for f in sorted(os.listdir(directory)) if f.startswith("state-"))
            with open(os.path.join(directory, shard), "r+b") as f:
                f.truncate(max(0, os.path.getsize(f.name) // 2))


def fired(run_uri: str, name: str) -> dict | None:
    """The marker of a fault that fired (step, rank, time), for tests and the recovery benchmark."""
    try:
        return storage.read_json(storage.join(run_uri, "faults", f"{name}.json"))
    except FileNotFoundError:
        return None
