"""The step watchdog: a rank that goes `failure.step_timeout_s` without progress (a hung data read, a collective
a peer never joins, a stuck kernel) ends its worker process, so Ray Train sees a failed worker and its restart
policy resumes the run from the last good checkpoint. Without it a stuck rank waits forever, and its peers wait
in their collectives until those time out (the driver sets the same limit on them, TorchConfig(timeout_s))."""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Optional

from raypt.hooks.base import Hook

EXIT_CODE = 124  # as timeout(1) reports a command it ended


class Watchdog(Hook):
    """A step, with its evaluation and checkpoint write, must end within the limit of the previous one's end;
    the limit starts when the engine is built (DeepSpeed's one-off op builds do not count), `end` disarms it."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.step, self.deadline, self.done = 0, float("inf"), threading.Event()

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        self.loop = loop
        self._progress(0)
        threading.Thread(target=self._watch, name="raypt-watchdog", daemon=True).start()

    def _progress(self, step: int) -> None:
        self.step, self.deadline = step, time.monotonic() + self.timeout_s

    def step_end(self, loop: Any, step: int, record: dict) -> None:
        self._progress(step)

    def end(self, loop: Any) -> None:
        self.done.set()

    def _watch(self) -> None:
        # Sleeps until the current deadline; progress meanwhile only moves the deadline, so it wakes once per
        # timeout at most.
        while not self.done.wait(max(0.0, self.deadline - time.monotonic())):
            if time.monotonic() >= self.deadline:
                self._expire()

    def _expire(self) -> None:
        import ray

        message = (f"watchdog: rank {self.rank} made no progress for {self.timeout_s:g} s "
                   f"(failure.step_timeout_s) after step {self.step}; ending its worker so the run restarts")
        print(f"[raypt] {message}", flush=True)
        if self.loop.sink is not None:
            try:
                ray.get(self.loop.sink.note.remote(message), timeout=5)
            except Exception:  # the note is a courtesy; ending the worker is what matters
                pass
        os._exit(EXIT_CODE)
