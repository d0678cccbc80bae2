"""`train.on_nonfinite`: what a step whose loss is NaN or infinite on any rank does. The engine asks `gate` once per
step, before the update; one all-reduce of this rank's finite flag makes every rank take the same decision.

  stop      the run fails naming the step; the update is not applied and checkpoints in flight land first
  skip      the update is not applied (no optimizer step, Adam's counter included) and training goes on
  rollback  the step is recorded in the run folder (`nonfinite.json`) and the run fails over to Ray Train's restart:
            it resumes from the last good checkpoint and, on this and every later attempt, skips that step's update
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from raypt import storage
from raypt.hooks.base import Hook
from raypt.metrics import Metric

MARKER = "nonfinite.json"


class NonFiniteLoss(RuntimeError):
    """A step's loss was NaN or infinite and `train.on_nonfinite` says to stop (or to roll back)."""


def skipped_steps(run_uri: str) -> list[int]:
    """The steps whose batches a rollback skips, as recorded in the run folder."""
    try:
        return storage.read_json(storage.join(run_uri, MARKER))["skip_steps"]
    except FileNotFoundError:
        return []


class NonFinite(Hook):
    metrics = (Metric("update_skipped", "max", "1 when the step's update was not applied (train.on_nonfinite)"),)

    def __init__(self, policy: str, run_uri: str, rank: int):
        self.policy, self.run_uri, self.rank = policy, run_uri, rank
        self.step, self.skipped = 0, False

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        self.loop, self.skip = loop, set(skipped_steps(self.run_uri))
        loop.engine.update_gate = self.gate

    def before_step(self, loop: Any, step: int) -> None:
        self.step, self.skipped = step, False

    def gate(self, finite: torch.Tensor) -> bool:
        """Whether this step's update goes ahead; the same answer on every rank."""
        import torch.distributed as dist

        if self.step in self.skip:  # a rollback's offending batch: every rank read the same record
            self.skipped = True
            return False
        bad = (~finite).to(torch.float32).reshape(1)
        dist.all_reduce(bad)
        ranks = int(bad.item())
        if not ranks:
            return True
        what = f"the loss of step {self.step} is NaN or infinite on {ranks} of {dist.get_world_size()} ranks"
        if self.policy == "skip":
            self.skipped = True
            return False
        self.loop.uploader.wait()  # the checkpoints written so far are whole before the group fails
        if self.policy == "rollback":
            if self.rank == 0:
                storage.write_json(storage.join(self.run_uri, MARKER),
                                   {"skip_steps": sorted(self.skip | {self.step})})
            dist.barrier()  # the record is in storage before any rank fails and the group restarts
            raise NonFiniteLoss(f"train.on_nonfinite=rollback: {what}; restarting from the last good checkpoint "
                                f"and skipping this step's batch")
        raise NonFiniteLoss(f"train.on_nonfinite=stop: {what}; its update was not applied and the checkpoints "
                            f"are intact; to train past it, run again with train.on_nonfinite=skip or rollback")

    def measure(self, loop: Any, step: int) -> dict[str, float]:
        return {"update_skipped": float(self.skipped)}

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if not record["update_skipped"]:
            del record["update_skipped"]  # a record says so only when it happened
        elif self.rank == 0:
            loop.note(f"step {step}: update skipped (train.on_nonfinite={self.policy}; loss {record['loss']})")
