"""The run's metrics sink: one actor beside the driver that writes metrics.jsonl and sends every record to the
run's trackers (TensorBoard by default; MLflow, W&B: raypt/metrics/trackers.py). For a run on object storage it
writes a local folder and mirrors it to the run's storage at every checkpoint; a driver started anywhere else
continues from that copy."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from typing import Callable, Optional, Sequence

import pyarrow.fs as pafs
import ray

from raypt import storage
from raypt.metrics.trackers import TRACKERS

METRICS = "metrics.jsonl"


class Sink:
    """The sink itself, without Ray (MetricsSink below is this class as an actor). Rank 0 sends records without
    waiting, the driver polls for progress. metrics.jsonl is the run's record of truth: a tracker that fails to
    log (its server down) costs a console line, not the run."""

    def __init__(self, run_dir: str, trackers: Sequence[str] = ("tensorboard",), run_name: Optional[str] = None,
                 group: Optional[str] = None, config: Optional[dict] = None, remote: Optional[str] = None):
        """`remote`: the run's folder in object storage when `run_dir` is its local stand-in."""
        os.makedirs(run_dir, exist_ok=True)
        self.dir, self.remote = run_dir, remote
        self.path = os.path.join(run_dir, METRICS)
        self.latest: dict = {}
        self.events: list[str] = []
        self.pending: list[dict] = []
        self.reports: list[dict] = []  # rank 0's reports to Ray, for a Tune trial that follows its run
        self.acked = -1  # the last step whose report that trial handed to Tune and Tune took
        self.flushed_at = time.monotonic()
        self.failing: set[str] = set()  # trackers whose last log failed: one line per outage, not per flush
        self.trackers = {name: TRACKERS[name]() for name in trackers}
        self.mirrored = (METRICS, *(f for name in trackers for f in TRACKERS[name].files))
        self.uploaded: dict[str, tuple[int, int]] = {}  # file -> (size, mtime) of the copy storage holds
        if remote:
            self.fetch()  # before the trackers start: MLflow and W&B find their run ids in the fetched files
        # Started here, so a tracker that cannot start (no credentials, no server) fails the sink's first call.
        for tracker in self.trackers.values():
            tracker.start(run_name or os.path.basename(os.path.normpath(run_dir)), group, config or {}, run_dir)

    def fetch(self) -> None:
        """Storage's copy of the run files replaces the local one: it covers every checkpoint (this driver may be
        on another machine, its local folder empty or older). What storage lacks stays as it is here."""
        fs, path = storage.resolve(self.remote)
        try:
            found = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))}
        except OSError as e:
            raise storage.explain(self.remote, e) from None
        for name in self.mirrored:
            if name in found:
                local = os.path.join(self.dir, name)
                if os.path.isdir(local):  # event files of attempts storage never saw would show beside its own
                    shutil.rmtree(local)
                storage.copy_tree(storage.join(self.remote, name), local)

    def begin(self, start_step: int) -> None:
        """A (re)started attempt: drop records past the step it resumes from, so each step appears once."""
        self.write()
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
            self.write()

    def report(self, metrics: dict) -> None:
        """What rank 0 reported to Ray (at each evaluation and checkpoint: every declared metric's latest value)."""
        self.reports.append(metrics)

    def take_reports(self) -> list[dict]:
        """The reports since the last call, in step order."""
        self.write()
        reports, self.reports = self.reports, []
        return reports

    def received(self) -> None:
        """A barrier: a caller's records sent before this call have arrived (one caller's calls run in order)."""

    def ack(self, step: int) -> None:
        self.acked = max(self.acked, step)

    def acked_step(self) -> int:
        return self.acked

    def flush(self) -> None:
        """Before a checkpoint can land (rank 0 waits for this): every record so far in the run files, and for a
        remote run in storage, so a resume from that checkpoint, by any driver, finds every step's record."""
        self.write()
        for name, tracker in self.trackers.items():
            self.guard(name, "could not flush", tracker.flush)
        if self.remote:
            self.upload()

    def upload(self) -> None:
        """The mirrored files that changed since the last upload (TensorBoard keeps one file per attempt)."""
        for rel, stat in self.files().items():
            if self.uploaded.get(rel) != stat:
                storage.copy_tree(os.path.join(self.dir, rel), storage.join(self.remote, *rel.split(os.sep)))
                self.uploaded[rel] = stat

    def files(self) -> dict[str, tuple[int, int]]:
        """The mirrored files here, by path in the run folder: (size, mtime)."""
        out = {}
        for name in self.mirrored:
            top = os.path.join(self.dir, name)
            paths = [top] if os.path.isfile(top) else [os.path.join(d, n) for d, _, ns in os.walk(top) for n in ns]
            for path in paths:
                st = os.stat(path)
                out[os.path.relpath(path, self.dir)] = (st.st_size, st.st_mtime_ns)
        return out

    def write(self) -> None:
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
        self.write()
        events, self.events = self.events, []
        return self.latest, events

    def close(self) -> None:
        self.write()
        for name, tracker in self.trackers.items():
            self.guard(name, "could not close", tracker.close)


MetricsSink = ray.remote(num_cpus=0)(Sink)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, METRICS)) as f:
        return [json.loads(line) for line in f]
