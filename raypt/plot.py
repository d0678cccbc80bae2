"""`raypt plot`: a job's schedules against global tokens, and metrics of finished or running runs, as PNG files
(local or s3://). Headless: matplotlib's Agg backend, so it works on clusters and in CI."""
from __future__ import annotations

import io
import json
import os
import textwrap
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np
from pydantic import BaseModel

from raypt import storage
from raypt.config import ConfigError, JobConfig
from raypt.schedules import Schedule
from raypt.schedules.warmup import Warmup

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from raypt.data.mix import MixPlan

# What a schedule field's values are called and what scales them. A schedule field not listed here still gets a
# panel, under its dotted key, as a share of its peak (1.0).
PEAKS: dict[str, tuple[str, Callable[[JobConfig], float]]] = {"train.schedule": ("lr", lambda cfg: cfg.train.lr),
                                                               "sparsity.schedule": ("sparsity",
                                                                                     lambda cfg: cfg.sparsity.final)}
MAX_POINTS = 20_000  # steps drawn per curve: enough to show a warm-up of 0.01% of the run, cheap for any length
X_KEYS = ("tokens_seen", "step")
METRICS = "metrics.jsonl"  # raypt.metrics.sink's file; not imported from there, which would import Ray


def schedule_fields(node: Any, key: str = "") -> Iterator[tuple[str, Schedule]]:
    """Every schedule-valued field of a config section, by dotted key, at any depth: a schedule field added to
    the job later is plotted without a change here."""
    if isinstance(node, Schedule):
        yield key, node
    elif isinstance(node, BaseModel):
        for name in type(node).model_fields:
            yield from schedule_fields(getattr(node, name), f"{key}.{name}" if key else name)
    elif isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            yield from schedule_fields(item, f"{key}.{i}")
    elif isinstance(node, dict):
        for k, item in node.items():
            yield from schedule_fields(item, f"{key}.{k}")


def token_plan(cfg: JobConfig) -> MixPlan:
    """The job's training mix plan (raypt.data.mix.MixPlan): global tokens after each step, as the loop counts
    them, from the task's tokens per sample of each prepared source."""
    from raypt import preflight
    from raypt.tasks import job_plan

    with storage.settings(cfg.s3.env()):
        return job_plan(cfg, preflight.check_data_path(cfg))  # unprepared data: an error naming the source


def schedule_figure(cfg: JobConfig) -> Figure:
    """One panel per schedule field: its value at every step (or MAX_POINTS of them) against the global tokens
    after that step, exactly as the loop sets it (the `lr` of metrics.jsonl)."""
    plt = pyplot()
    plan, steps = token_plan(cfg), cfg.train.steps
    total = plan.tokens_before(steps)
    at = np.unique(np.linspace(1, steps, min(steps, MAX_POINTS)).round().astype(int))
    tokens = np.array([plan.tokens_before(int(s)) for s in at], dtype=float)
    fields = list(schedule_fields(cfg))
    fig, axes = plt.subplots(len(fields), 1, figsize=(8, 3.5 * len(fields)), squeeze=False)
    for ax, (key, schedule) in zip(axes[:, 0], fields):
        label, peak_of = PEAKS.get(key, (key, lambda _: 1.0))
        peak = peak_of(cfg)
        ax.plot(tokens, [schedule.value(t, total, peak) for t in tokens], label=label)
        if isinstance(schedule, Warmup) and 0 < schedule.warmup_end(total) < total:
            ax.axvline(schedule.warmup_end(total), color="gray", linestyle=":", label="warm-up end")
        for i, start in enumerate(plan.tokens_at[1:], 1):  # data.stages: where the mix changes
            ax.axvline(start, color="tab:orange", linestyle="--", label="data stage" if i == 1 else None)
        settings = ", ".join(f"{k}={v}" for k, v in schedule.model_dump(exclude={"name"}, exclude_none=True).items())
        ax.set_title(textwrap.fill(f"{key}: {schedule.name} ({settings}); peak {peak:g}, {steps} steps, "
                                   f"{total:,} tokens", 100), fontsize=9)
        ax.set_xlabel("global tokens seen")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_schedule(cfg: JobConfig, out: str) -> str:
    """Write the job's schedules (schedule_figure) to `out` (local or s3://); the path written."""
    return save_png(schedule_figure(cfg), out)


def read_records(folder: str) -> list[dict]:
    """A run folder's metrics.jsonl (local or s3://)."""
    try:
        text = storage.read_text(storage.join(folder, METRICS))
    except FileNotFoundError:
        raise ConfigError(f"plot: '{folder}' holds no {METRICS}; expected a run folder such as runs/NAME") from None
    lines = text.splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:  # the last line of a running run may be half written; any other is damage
                raise ConfigError(f"plot: '{folder}/{METRICS}' line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def run_name(folder: str) -> str:
    return os.path.basename(folder.rstrip("/")) or folder


def runs_figure(folders: list[str], metric: str, x: str = "tokens_seen") -> Figure:
    """One line per run: `metric` against `x` over the records that have both."""
    if x not in X_KEYS:
        raise ConfigError(f"--x: got {x!r}; expected {' or '.join(X_KEYS)}")
    curves, keys = {}, set()
    for folder in folders:
        records = read_records(folder)
        keys.update(k for r in records for k, v in r.items() if _number(v))
        points = [(r[x], r[metric]) for r in records if _number(r.get(metric)) and _number(r.get(x))]
        if points:
            curves[folder] = points
    if not curves:
        raise ConfigError(f"--metric: got {metric!r}, which no record of {', '.join(folders)} has; expected one "
                          f"of {', '.join(sorted(keys)) or '(no records yet)'}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for folder, points in curves.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o" if len(points) < 50 else None, markersize=3, label=run_name(folder))
    ax.set_xlabel("global tokens seen" if x == "tokens_seen" else "step")
    ax.set_ylabel(metric)
    ax.set_title(metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_runs(folders: list[str], metric: str, out: str, x: str = "tokens_seen") -> str:
    """Write `metric` of every run (runs_figure) to `out` (local or s3://); the path written."""
    return save_png(runs_figure(folders, metric, x), out)


def _number(value: Any) -> bool:
    """A value a curve can take: records also hold flags and counts by source (bad_records), which it cannot."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (the figures of plot, fit-scaling and sweep curves)."""
    import matplotlib

    matplotlib.use("Agg")  # headless: clusters and CI have no display
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Figure, out: str) -> str:
    """Write a figure as a PNG to a local path or s3:// URI, and close it; the path written."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    pyplot().close(fig)
    fs, path = storage.resolve(out)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(buf.getvalue())
    except OSError as e:  # storage that does not answer exits 1; a local path that cannot be written is --out's
        raise storage.explain(out, e) if "://" in out else ConfigError(f"--out: cannot write '{out}': {e}") from None
    return out
