"""In-memory snapshots every `checkpoint.memory_every` steps (raypt/checkpoint/memory.py): each rank's share is
copied at the end of the step, then held off the training thread. A snapshot is recorded once the step's records
reached the metrics sink (SinkReport sends them at these steps), so a run resumed from it finds every record."""
from __future__ import annotations

import time
from typing import Any, Optional

from raypt.hooks.base import Hook


class MemorySnapshot(Hook):
    name = "memory_snapshot"

    def __init__(self, registry: Any, sink: Optional[Any]):
        self.registry, self.sink = registry, sink
        self.sender: Optional[Any] = None
        self.held_s: Optional[float] = None  # the last snapshot's time on the training thread, for the next record
        self.off = False

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        from raypt.checkpoint.memory import Sender

        self.sender = Sender(self.registry, loop.rank, loop.world)
        self.job = (loop.cfg.model_dump(mode="json"), loop.cfg.trajectory())  # fixed for the run: dumped once
        if loop.rank == 0:  # before any rank can send: the failed group's newer or partial snapshots go
            import ray
            from ray.exceptions import RayError

            from raypt.checkpoint.memory import registry_gone

            try:
                ray.get(self.registry.begin.remote(loop.state.step))
            except RayError as e:
                self.off = True
                loop.note(f"{registry_gone(e)}: in-memory snapshots are off for this attempt, durable checkpoints "
                          "go on")

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if self.held_s is not None:  # the previous snapshot's: this record is the first to leave after it
            record["memory_snapshot_s"], self.held_s = self.held_s, None

    def step_end(self, loop: Any, step: int, record: dict) -> None:
        from raypt.checkpoint.write import index_body

        if self.off:
            return
        t = time.perf_counter()
        if self.settle(loop):
            return
        states = loop.hooks.states()
        body = index_body(loop.engine, loop.state, states, *self.job) if loop.rank == 0 else None
        arrived = self.sink.received.remote() if loop.rank == 0 and self.sink is not None else None
        self.sender.submit(loop.engine, step, body, states, arrived)
        self.held_s = time.perf_counter() - t

    def settle(self, loop: Any) -> bool:
        """Wait for the snapshot in flight; say why it failed, if it did. True when snapshots cannot go on (one
        does not fit its limit): the run goes on with its durable checkpoints."""
        failed = self.sender.wait()
        if failed:
            why, fatal = failed
            self.off = fatal
            loop.note(f"rank {loop.rank}: {why}" + ("; in-memory snapshots are off for this attempt, durable "
                                                     "checkpoints go on" if fatal else ""))
        return self.off

    def end(self, loop: Any) -> None:
        if not self.off:
            self.settle(loop)
