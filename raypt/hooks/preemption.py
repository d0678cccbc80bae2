"""Graceful preemption. SIGTERM (a spot reclaim, a pod eviction) only marks the worker; at the next step
boundary every rank learns of it through the step's all-reduce, they commit a checkpoint together, and the
marked worker exits. A watchdog exits anyway when the grace period runs out (a hung collective, a slow save).
Ray's own reclaim notice (a node being drained) triggers the same checkpoint, without the exit.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Optional

from raypt.hooks.base import Hook
from raypt.metrics import Metric

# Ray Train's preemption watcher; the embedded one-node cluster turns it off (it is never drained), and then no
# drain notice can come, so the loop skips the check (and its barrier).
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"

_signalled_at: Optional[float] = None
_grace_s = 25.0


def install() -> None:
    """Must run on the process's main thread: Ray Train unpickles the train function there, importing raypt.loop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    global _signalled_at
    if _signalled_at is None:
        _signalled_at = time.time()
        threading.Timer(_grace_s, exit_now).start()


def signalled() -> bool:
    return _signalled_at is not None


def exit_now() -> None:
    """Leave as a failed worker (exit code 143, as SIGTERM would), so Ray Train restarts the group."""
    os._exit(143)


class Preemption(Hook):
    """SIGTERM on any rank, or Ray's drain notice every `failure.preemption_check_every` steps -> checkpoint."""

    metrics = (Metric("preempted", "sum", "ranks that received SIGTERM (a checkpoint follows at once)"),)

    def __init__(self, grace_s: float, drain_every: int):
        global _grace_s
        _grace_s = grace_s
        self.drain_every = drain_every if os.environ.get(PREEMPTION_WATCHER, "1") != "0" else 0
        self.saved_for_drain = False

    def measure(self, loop: Any, step: int) -> dict[str, float]:
        return {"preempted": float(signalled())}

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if record["preempted"]:
            loop.request_checkpoint()
        elif self._draining(step):
            loop.request_checkpoint()
            record["node_drain"] = True  # why this step has a checkpoint
        if not record["preempted"]:
            del record["preempted"]  # a record says so only when it happened

    def _draining(self, step: int) -> bool:
        import ray.train

        if not self.drain_every or step % self.drain_every or self.saved_for_drain:
            return False
        if ray.train.get_preemption_info() is None:
            return False
        self.saved_for_drain = True
        return True

    def step_end(self, loop: Any, step: int, record: dict) -> None:
        """The checkpoint of a preempted step is in storage before the signalled rank leaves."""
        if record.get("preempted"):
            loop.uploader.wait()
            if signalled():
                exit_now()
