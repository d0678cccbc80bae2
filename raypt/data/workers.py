"""Where `data prepare` does its work: Ray tasks (the cluster's CPUs, or `data.prepare.parallel`) or, for 1, this
process; results come back in input order with a bounded number in flight, so one ordered writer on the driver
sees the same sequence at any parallelism. Each task reports the memory it took, so the bound can be checked.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from tqdm import tqdm

MB = 1 << 20
LOG_EVERY_S = 60.0  # off a terminal, a progress line this often, once a preparation has run this long


@dataclass(frozen=True)
class Budget:
    """How data.prepare.max_memory_mb is shared out in each process. A task holds its input one block at a time,
    its result (int32 tokens: at most 4 bytes per input byte, about 1.2 for code) and one batch being tokenized
    (the tokenizer's encodings take ~100 bytes a token); the driver holds one result, a row group per split and,
    between the passes, the tokenizer's training sample and the trainer's state (about 4x the sample)."""
    mb: int

    @property
    def task_bytes(self) -> int:
        return self.mb * MB // 32

    @property
    def batch_chars(self) -> int:
        return max(self.mb * MB // 512, 1 << 15)

    @property
    def sample_bytes(self) -> int:
        return self.mb * MB // 16


def resident_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    return _status("VmRSS")


def peak_mb() -> float:
    """The most this process held since the last reset_peak (Linux: the kernel's high-water mark)."""
    return _status("VmHWM")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    except OSError:
        pass


def _status(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith(key + ":"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return 0.0


def measured(fn: Callable, *args: Any) -> tuple[Any, dict]:
    """fn(*args), with the peak memory of this process while it ran and how much it added."""
    start = resident_mb()
    reset_peak()
    out = fn(*args)
    return out, {"peak_mb": peak_mb(), "added_mb": peak_mb() - start}


class Workers:
    """Runs jobs in order on `parallel` Ray tasks, or in this process for 1; keeps the memory figures of the
    driver (this process) and of the largest task."""

    def __init__(self, parallel: int):
        self.parallel = parallel
        self.start_mb = resident_mb()
        reset_peak()
        self.driver_peak = peak_mb()
        self.task = {"peak_mb": 0.0, "added_mb": 0.0}
        self.tasks = 0

    def map(self, fn: Callable, jobs: Iterable[tuple]) -> Iterator[Any]:
        """fn(*job) for each job, yielded in job order; at most `parallel` are submitted and not yet taken back.
        A consumer that stops early (a corpus's size reached, a bad record under `fail`) cancels the rest."""
        if self.parallel == 1:
            for job in jobs:
                self.driver_peak = max(self.driver_peak, peak_mb())  # before `measured` resets it
                out, memory = measured(fn, *job)
                self._count(memory)
                yield out
            return
        import ray

        remote = ray.remote(num_cpus=1)(measured)
        pending: deque = deque()
        todo = iter(jobs)

        def submit() -> None:
            job = next(todo, None)
            if job is not None:
                pending.append(remote.remote(fn, *job))

        for _ in range(self.parallel):
            submit()
        try:
            while pending:
                try:
                    out, memory = ray.get(pending.popleft())
                except ray.exceptions.RayTaskError as e:  # the task's own error (a ConfigError, a storage error)
                    raise e.cause from e
                self._count(memory)
                submit()
                yield out
        finally:
            for ref in pending:
                ray.cancel(ref)

    def _count(self, memory: dict) -> None:
        self.tasks += 1
        self.task = {k: max(v, memory[k]) for k, v in self.task.items()}

    def memory(self) -> dict:
        """Peak resident MB of the driver and of the largest task, and what each added to its process."""
        peak = max(self.driver_peak, peak_mb())
        return {"driver_peak_mb": peak, "driver_added_mb": peak - self.start_mb, "task_peak_mb": self.task["peak_mb"],
                "task_added_mb": self.task["added_mb"], "tasks": self.tasks, "parallel": self.parallel}


def parallelism(setting: int | None) -> int:
    """data.prepare.parallel, else one task per CPU of the Ray cluster this process is attached to, else 1. An
    explicit setting above 1 starts the embedded cluster (or attaches to RAY_ADDRESS) when none is up."""
    if setting == 1 or (setting is None and "ray" not in sys.modules):  # Ray never imported: none is up
        return 1
    import ray

    if setting is not None:
        if not ray.is_initialized():
            from raypt.driver import init_ray

            init_ray()
        return setting
    return max(1, int(ray.cluster_resources().get("CPU", 1))) if ray.is_initialized() else 1


class Progress:
    """Files, bytes, records and bad records of one pass: a bar on a terminal; elsewhere (logs, `ray job submit`)
    a plain line a minute once the pass has run a minute, so short runs and tests print nothing."""

    def __init__(self, what: str, total_bytes: int):
        self.what, self.total, self.began, self.logged = what, total_bytes, time.monotonic(), time.monotonic()
        self.counts = {"files": 0, "bytes": 0, "records": 0, "bad": 0}
        self.bar = tqdm(total=total_bytes, desc=what, unit="B", unit_scale=True, file=sys.stderr,
                        disable=not sys.stderr.isatty(), leave=False)

    def add(self, files: int, nbytes: int, records: int, bad: int = 0) -> None:
        for key, n in zip(self.counts, (files, nbytes, records, bad)):
            self.counts[key] += n
        self.bar.update(nbytes)
        self.bar.set_postfix(files=self.counts["files"], records=self.counts["records"], bad=self.counts["bad"],
                             refresh=False)
        now = time.monotonic()
        if self.bar.disable and now - self.logged >= LOG_EVERY_S and now - self.began >= LOG_EVERY_S:
            self.logged = now
            c = self.counts
            print(f"raypt: {self.what}: {c['files']} files, {c['bytes'] / MB:.0f} of {self.total / MB:.0f} MB, "
                  f"{c['records']} records, {c['bad']} bad", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
