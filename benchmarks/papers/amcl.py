"""AMCL reproduction (Wang et al., ECCV 2024): AMCL (3 heads, pair-wise temperatures) against single-head SimCLR
with 1, 3 and 5 augmentation types on scikit-learn's labelled digits, three seeds each, scored by the linear probe
and the k-NN accuracy of frozen features on the held-out digits.

Runs the user's commands, in order, from the repository root (each its own process and embedded cluster):
  raypt data prepare jobs/papers/amcl/base.yaml              (skipped when data/digits is prepared)
  raypt tune jobs/papers/amcl/sweep.yaml                     (18 trials: 2 methods x 3 augmentation sets x 3 seeds)
Then tabulates each variant's final accuracies (mean and spread over seeds), the initial (random encoder) ones, and
AMCL's gain over SimCLR at each augmentation count. Writes benchmarks/papers/amcl.table.md (quoted in amcl.md) and
benchmarks/results/amcl.json. A sweep continues where it stopped; `--report` only rewrites the table and results
from the runs on disk.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import raypt_command as raypt, timed_unless_report, write_result  # noqa: E402

from raypt.metrics.sink import read_metrics  # noqa: E402

JOBS = "jobs/papers/amcl"
SWEEP = ROOT / "sweeps/papers/amcl"
METRICS = ("probe_acc", "knn_acc")


def trials() -> list[dict]:
    """Each trial: its variant, seed, first and last evaluation's accuracies, its temperatures and wall time."""
    rows = []
    for trial in sorted(SWEEP.glob("trial-*")):
        drawn = json.loads((trial / "values.json").read_text())
        evaluations = [r for r in read_metrics(str(trial)) if "probe_acc" in r]
        if not evaluations or not (trial / "summary.json").exists():
            continue  # not finished
        first, last = evaluations[0], evaluations[-1]
        summary = json.loads((trial / "summary.json").read_text())
        rows.append({"trial": trial.name, "variant": drawn["variant"], "seed": drawn.get("run.seed"),
                     "step": last["step"], **{m: last[m] for m in METRICS},
                     **{f"initial_{m}": first[m] for m in METRICS},
                     "tau_pos_mean": last.get("tau_pos_mean"), "tau_neg_mean": last.get("tau_neg_mean"),
                     "wall_s": summary.get("wall_s")})
    return rows


def spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def report(wall: float) -> None:
    rows = trials()
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v.split("-")[1], v))
    by_variant = {v: {m: spread([r[m] for r in rows if r["variant"] == v]) for m in METRICS} for v in variants}
    gains = {}
    for augs in ("1aug", "3aug", "5aug"):
        amcl, simclr = by_variant.get(f"amcl-{augs}"), by_variant.get(f"simclr-{augs}")
        if amcl and simclr:
            gains[augs] = {m: amcl[m]["mean"] - simclr[m]["mean"] for m in METRICS}
    initial = {m: spread([r[f"initial_{m}"] for r in rows]) for m in METRICS}
    figures = {"rows": rows, "by_variant": by_variant, "amcl_minus_simclr": gains, "random_encoder": initial,
               "trials": len(rows), "wall_s": round(wall)}
    write_result("amcl", figures)
    lines = ["| variant | linear probe (mean ± std) | k-NN (mean ± std) | seeds |", "|---|---|---|---|"]
    lines += [f"| {v} | {s['probe_acc']['mean']:.4f} ± {s['probe_acc']['std']:.4f} | "
              f"{s['knn_acc']['mean']:.4f} ± {s['knn_acc']['std']:.4f} | {s['probe_acc']['n']} |"
              for v, s in by_variant.items()]
    lines += ["", "| augmentation types | AMCL - SimCLR, probe | AMCL - SimCLR, k-NN |", "|---|---|---|"]
    lines += [f"| {a[0]} | {g['probe_acc']:+.4f} | {g['knn_acc']:+.4f} |" for a, g in gains.items()]
    table = "\n".join(lines)
    (Path(__file__).parent / "amcl.table.md").write_text(
        f"Wall time: {wall / 60:.1f} min for {len(rows)} trials. The random encoder (step 0, every trial): probe "
        f"{initial['probe_acc']['mean']:.4f} ± {initial['probe_acc']['std']:.4f}, k-NN "
        f"{initial['knn_acc']['mean']:.4f} ± {initial['knn_acc']['std']:.4f}.\n\n{table}\n")
    print(table)


def run() -> None:
    if not (ROOT / "data/digits/manifest.json").exists():
        raypt("data", "prepare", f"{JOBS}/base.yaml")
    raypt("tune", f"{JOBS}/sweep.yaml")


if __name__ == "__main__":
    report(timed_unless_report("amcl", run))
