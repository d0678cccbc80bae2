"""A sweep's results, read from its trials' own run folders (so `raypt tune show` works on a running sweep too):
results.csv and results.md (a row per trial), curves.png (the metric against tokens), best.yaml (a runnable job)."""
from __future__ import annotations

import csv
import io
import json
import re
from typing import Any, Optional

import yaml

from raypt import storage
from raypt.tune.sweep import SweepConfig, value_at
from raypt.tune.trial import VALUES

STATUS = "trials.json"  # each trial's end as Tune saw it: finished, stopped early, failed


def _read(uri: str) -> Optional[str]:
    try:
        return storage.read_text(uri)
    except FileNotFoundError:  # a trial that has not written it yet
        return None


def trials(sweep: SweepConfig) -> list[dict]:
    """One row per trial run folder: searched values, step, tokens, final and best metric, wall time, status,
    and the metric's curve (tokens, value)."""
    import pyarrow.fs as pafs

    fs, path = storage.resolve(sweep.folder)
    names = sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
                   if i.type == pafs.FileType.Directory and re.fullmatch(r"trial-\d+", i.base_name))
    ended = json.loads(_read(storage.join(sweep.folder, STATUS)) or "{}")
    better = min if sweep.mode == "min" else max
    rows = []
    for name in names:
        folder = storage.join(sweep.folder, name)
        job = yaml.safe_load(_read(storage.join(folder, "config.yaml")) or "{}") or {}
        records = [json.loads(line) for line in (_read(storage.join(folder, "metrics.jsonl")) or "").splitlines()]
        curve = [(r.get("tokens_seen", 0), r[sweep.metric]) for r in records if r.get(sweep.metric) is not None]
        summary = json.loads(_read(storage.join(folder, "summary.json")) or "{}")
        drawn = json.loads(_read(storage.join(folder, VALUES)) or "{}")
        times = [r["time"] for r in records if "time" in r]
        rows.append({
            "trial": name, **({"variant": drawn.get("variant")} if sweep.variants else {}),
            **{k: value_at(job, k) for k in sweep.search},
            "step": max((r["step"] for r in records), default=0),
            "tokens": max((r.get("tokens_seen", 0) for r in records), default=0),
            f"final_{sweep.metric}": curve[-1][1] if curve else None,
            f"best_{sweep.metric}": better(v for _, v in curve) if curve else None,
            "wall_s": summary.get("wall_s") or (times[-1] - times[0] if len(times) > 1 else None),
            "lineage": " ".join(f"<-{r['continued_from']['trial']}@{r['continued_from']['step']}" for r in records
                                if "continued_from" in r),  # PBT: whose checkpoint it continued from, when
            "status": ended.get(name) or ("finished" if summary else "running"),
            "curve": curve, "job": job})
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def table(sweep: SweepConfig, rows: Optional[list[dict]] = None) -> str:
    """The trials as a Markdown table (readable on a console too)."""
    rows = trials(sweep) if rows is None else rows
    if not rows:
        return f"sweep {sweep.name}: no trial has started yet"
    keys = [k for k in rows[0] if k not in ("curve", "job")]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def best(sweep: SweepConfig, rows: list[dict]) -> Optional[dict]:
    """The trial with the best final metric, finished trials first (an early-stopped trial's last value is from
    fewer tokens)."""
    key = f"final_{sweep.metric}"
    scored = [r for r in rows if r[key] is not None]
    done = [r for r in scored if r["status"] == "finished"] or scored
    if not done:
        return None
    return (min if sweep.mode == "min" else max)(done, key=lambda r: r[key])


def write_results(sweep: SweepConfig, base_job: dict, results: dict[str, Any]) -> None:
    """After the sweep: each trial's end, the tables, the curves and best.yaml in the sweep folder."""
    ended = {}
    for row in trials(sweep):
        result = results.get(row["trial"])
        if result is not None:
            done = row["step"] >= value_at(row["job"], "train.steps")
            ended[row["trial"]] = "failed" if result.error else ("finished" if done else "stopped early")
    storage.write_text(storage.join(sweep.folder, STATUS), json.dumps(ended, indent=1))
    rows = trials(sweep)
    keys = [k for k in rows[0] if k not in ("curve", "job")] if rows else []
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: _cell(r[k]) if isinstance(r[k], (dict, list)) else r[k] for k in keys} for r in rows)
    storage.write_text(storage.join(sweep.folder, "results.csv"), out.getvalue())
    storage.write_text(storage.join(sweep.folder, "results.md"), f"# sweep {sweep.name}\n\n{table(sweep, rows)}\n")
    _plot(sweep, rows)
    winner = best(sweep, rows)
    if winner is not None:
        job = dict(winner["job"])
        job["run"] = {**job["run"], "name": f"{sweep.name}-best", "storage": base_job["run"]["storage"],
                      "group": base_job["run"].get("group")}
        values = ", ".join(f"{k}={_cell(winner[k])}" for k in sweep.space())
        header = (f"# The best trial of sweep {sweep.name} ({winner['trial']}: {values}; final {sweep.metric} "
                  f"{_cell(winner[f'final_{sweep.metric}'])}), as a job: raypt train best.yaml\n")
        storage.write_text(storage.join(sweep.folder, "best.yaml"), header + yaml.safe_dump(job, sort_keys=False))


def _plot(sweep: SweepConfig, rows: list[dict]) -> None:
    from raypt.plot import pyplot, save_png

    fig, ax = pyplot().subplots(figsize=(8, 5))
    for r in rows:
        if r["curve"]:
            tokens, values = zip(*r["curve"])
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={_cell(r[k])}" for k in sweep.space())
            ax.plot(tokens, values, marker="o", markersize=3, label=f"{r['trial']}: {label} ({r['status']})")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(sweep.metric)
    ax.set_title(f"sweep {sweep.name}")
    ax.legend(fontsize=7)
    save_png(fig, storage.join(sweep.folder, "curves.png"))
