"""The run's metrics sink: one actor beside the driver that writes metrics.jsonl and sends every record to the
run's trackers (TensorBoard by default; MLflow, W&B: raypt/metrics/trackers.py)."""
from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Callable, Optional, Sequence

import ray

from raypt.metrics.trackers import TRACKERS


class Sink:
    """The sink itself, without Ray (MetricsSink below is this class as an actor). Rank 0 sends records without
    waiting, the driver polls for progress. metrics.jsonl is the run's record of truth: a tracker that fails to
    log (its server down) costs a console line, not the run."""

    def __init__(self, run_dir: str, trackers: Sequence[str] = ("tensorboard",), run_name: Optional[str] = None,
                 group: Optional[str] = None, config: Optional[dict] = None):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.latest: dict = {}
        self.events: list[str] = []
        self.pending: list[dict] = []
        self.reports: list[dict] = []  # rank 0's reports to Ray, for a Tune trial that follows its run
        self.acked = -1  # the last step whose report that trial handed to Tune and Tune took
        self.flushed_at = time.monotonic()
        self.failing: set[str] = set()  # trackers whose last log failed: one line per outage, not per flush
        self.trackers = {name: TRACKERS[name]() for name in trackers}
        # Started here, so a tracker that cannot start (no credentials, no server) fails the sink's first call.
        for tracker in self.trackers.values():
            tracker.start(run_name or os.path.basename(os.path.normpath(run_dir)), group, config or {}, run_dir)

    def begin(self, start_step: int) -> None:
        """A (re)started attempt: drop records past the step it resumes from, so each step appears once."""
        self.flush()
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        for tracker in self.trackers.values():
            tracker.resume(start_step)

    def log(self, records: list[dict]) -> None:
        self.pending.extend(records)
        for record in records:
            self.latest = {**self.latest, **record}
        if time.monotonic() - self.flushed_at >= 1.0:  # on disk within a second even when nobody polls
            self.flush()

    def report(self, metrics: dict) -> None:
        """What rank 0 reported to Ray (at each evaluation and checkpoint: every declared metric's latest value)."""
        self.reports.append(metrics)

    def take_reports(self) -> list[dict]:
        """The reports since the last call, in step order."""
        self.flush()
        reports, self.reports = self.reports, []
        return reports

    def ack(self, step: int) -> None:
        self.acked = max(self.acked, step)

    def acked_step(self) -> int:
        return self.acked

    def flush(self) -> None:
        """Written in batches (on every poll, at most every second) so per-step logging costs the ranks' CPUs
        almost nothing."""
        self.flushed_at = time.monotonic()
        if not self.pending:
            return
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.pending)
        steps = f"steps {self.pending[0]['step']}-{self.pending[-1]['step']}"
        for name, tracker in self.trackers.items():
            self.guard(name, f"could not log {steps} (metrics.jsonl has them)", tracker.log, self.pending)
        self.pending = []

    def guard(self, name: str, what: str, call: Callable, *args) -> None:
        try:
            call(*args)
        except Exception as e:
            if name not in self.failing:
                # The error's own words, less any user:password@ a tracking URI may carry.
                reason = re.sub(r"://[^/\s@]+@", "://", f"{type(e).__name__}: {e}".splitlines()[0])[:300]
                message = f"tracker {name}: {what}: {reason}"
                self.note(message)
                print(message, file=sys.stderr)  # the driver log, also once polling has stopped
            self.failing.add(name)
        else:
            self.failing.discard(name)

    def note(self, message: str) -> None:
        self.events.append(message)

    def poll(self) -> tuple[dict, list[str]]:
        self.flush()
        events, self.events = self.events, []
        return self.latest, events

    def close(self) -> None:
        self.flush()
        for name, tracker in self.trackers.items():
            self.guard(name, "could not close", tracker.close)


MetricsSink = ray.remote(num_cpus=0)(Sink)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
