"""Where a step's record goes: the run's metrics sink (metrics.jsonl, the trackers, the driver's console), in
batches, and Ray (and so Tune) at every evaluation and every checkpoint."""
from __future__ import annotations

import time
from typing import Any, Optional

from raypt.hooks.base import Hook


class SinkReport(Hook):
    """Rank 0's records reach the sink about once a second: one actor call per second instead of one per step on
    the ranks' cores. Notable records (evaluations, resumptions, checkpoints) go at once, and so does the outbox at
    each in-memory snapshot (every `snapshot_every` steps), which a resumed run must find every record before."""

    def __init__(self, sink: Any, log_every: int, snapshot_every: int = 0):
        self.sink, self.log_every, self.snapshot_every = sink, log_every, snapshot_every
        self.outbox: list[dict] = []
        self.sent_at = 0.0

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        import ray

        ray.get(self.sink.begin.remote(loop.state.step))

    def send(self, record: Optional[dict], now: bool) -> None:
        self.outbox += [record] if record is not None else []
        if self.outbox and (now or time.monotonic() - self.sent_at >= 1.0):
            self.sink.log.remote(self.outbox)
            self.outbox, self.sent_at = [], time.monotonic()

    def save(self, loop: Any, step: int, record: dict) -> None:
        """Before the checkpoint can land: a resume from it must find every step's record."""
        import ray

        self.send(record, now=True)
        ray.get(self.sink.flush.remote())

    def step_end(self, loop: Any, step: int, record: dict) -> None:
        if loop.saved_this_step:
            return
        notable = "val_loss" in record or "resumed_from" in record
        snapshot = bool(self.snapshot_every) and step % self.snapshot_every == 0
        self.send(record if step % self.log_every == 0 or notable else None, now=notable or snapshot)

    def end(self, loop: Any) -> None:
        if self.outbox:
            self.sink.log.remote(self.outbox)
            self.outbox = []


class RayReport(Hook):
    """Every rank calls `ray.train.report` (a barrier) at each evaluation and each checkpoint; Ray keeps rank 0's
    metrics. Each report carries the latest value of every metric the run declared (Tune refuses a result that
    lacks the sweep's metric) and the URI of the last committed checkpoint. The latest values live in the
    checkpoint too: a resumed run's first report, at a checkpoint before its first evaluation, still has them."""

    name = "ray_report"

    def __init__(self) -> None:
        self.latest: dict = {}

    def state(self) -> tuple[dict, dict]:
        return {}, {"latest": self.latest}

    def restore(self, tensors: dict, state: dict) -> None:
        self.latest = dict(state.get("latest", {}))

    def keep(self, loop: Any, record: dict) -> None:
        """The declared metrics of a record; one-off entries (sample ids, where a run resumed) stay in their own
        report."""
        self.latest.update({k: v for k, v in record.items() if k in loop.reduce.declared})

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        self.keep(loop, record)  # before a checkpoint of this step saves `latest`

    def evaluate(self, loop: Any, step: int, record: dict) -> None:
        self.keep(loop, record)

    def step_end(self, loop: Any, step: int, record: dict) -> None:
        import ray.train

        self.keep(loop, record)
        if "val_loss" in record or loop.saved_this_step:
            committed = loop.uploader.committed
            ray.train.report({**self.latest, **record, **({"checkpoint": committed} if committed else {})})


class ResumeNote(Hook):
    """Rank 0 says where a resumed run came from, and which trajectory settings a fork changed; the first
    resumed step's record says `resumed_from_memory` when an in-memory snapshot was its source."""

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        from raypt.config import trajectory_diff

        self.from_memory = getattr(reader, "in_memory", False)
        if reader is None or loop.rank != 0:
            return
        if reader.state.world_size == 0:  # run.init_from: a new run on another model's weights (checkpoint.init)
            kept = "kept" if reader.holds_optimizer else "reset"
            loop.note(f"started from the weights of {reader.origin} (Adam's state {kept}; step, tokens and data "
                      "position from 0)")
            return
        source = "its in-memory snapshot, " if self.from_memory else ""
        loop.note(f"resumed from step {reader.state.step} ({source}{reader.state.world_size} -> {loop.world} "
                  f"workers, {loop.engine.micro_batches} accumulation steps)")
        changed = trajectory_diff(reader.trajectory, loop.cfg.trajectory()) if reader.trajectory else []
        if changed:  # only a fork (run.resume_from) gets here: the driver refuses it for an auto-resume
            loop.note(f"forked with changed settings: {', '.join(changed)}")

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if self.from_memory and "resumed_from" in record:
            record["resumed_from_memory"] = True


class SampleAudit(Hook):
    """`run.log_sample_ids`: every step's global sample ids, in global-batch order, for auditing that no sample
    is repeated or skipped across restarts and resizes."""

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        import torch
        import torch.distributed as dist

        # Shares differ by one sample when the ranks do not divide the batch: gather equal shapes, padded with -1.
        most = -(-loop.cfg.train.global_batch // loop.engine.dp_size)
        mine = torch.cat(loop.batches.ids)
        mine = torch.cat([mine, mine.new_full((most - len(mine),), -1)]).to(loop.engine.device)
        every = [torch.empty_like(mine) for _ in range(loop.engine.dp_size)]
        dist.all_gather(every, mine, group=loop.engine.dp_group)
        ids = torch.cat(every)
        record["sample_ids"] = ids[ids >= 0].tolist()
