""""The Journey Matters" reproduction (Jin et al. 2025): gradual global magnitude pruning to 80% sparsity over five
windows of one token budget, dense models of four widths on the same budget, and the average-parameter-count law.

Runs the user's commands, in order, from the repository root (each its own process and embedded cluster):
  raypt data prepare jobs/papers/sparsity/base.yaml          (skipped when data/stdlib-512 is prepared)
  raypt tune jobs/papers/sparsity/sweep.yaml                 (9 trials: 4 dense widths, 5 pruning windows)
  raypt fit-scaling sweeps/papers/sparsity --out benchmarks/papers/sparsity.png
Then asks the question the paper answers: do the sparse runs fall on the dense runs' curve when counted by N_avg
(and not by their final parameter count)? The law L = E + A / N^alpha is fitted to the dense runs alone and each
sparse run's loss is compared with its prediction at the run's N_avg and at its final N.
Writes benchmarks/papers/sparsity.table.md (quoted in sparsity.md), sparsity.png (the fit over every run) and
benchmarks/results/sparsity.json. A sweep continues where it stopped; `--report` only rewrites the table, fit and
results from the runs on disk.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import raypt_command as raypt, timed_unless_report, write_result  # noqa: E402

from raypt.metrics.sink import read_metrics  # noqa: E402

JOBS = "jobs/papers/sparsity"
SWEEP = ROOT / "sweeps/papers/sparsity"
PNG = Path(__file__).with_suffix(".png")


def trials() -> list[dict]:
    """Each finished trial: its variant, final validation loss, N_avg, final non-zero parameters and density."""
    rows = []
    for trial in sorted(SWEEP.glob("trial-*")):
        records = read_metrics(str(trial))
        last = {k: v for r in records for k, v in r.items()}  # each key's last value
        rows.append({"trial": trial.name, "variant": json.loads((trial / "values.json").read_text())["variant"],
                     "val_loss": last["val_loss"], "n_avg": last["n_avg"], "final_params": last["nonzero_params"],
                     "density": last["density"], "tokens": last["tokens_seen"]})
    return sorted(rows, key=lambda r: (r["variant"].startswith("sparse"), r["n_avg"]))


def report(wall: float, fit_output: str) -> None:
    import numpy as np

    from raypt import scaling

    rows = trials()
    pts = [scaling.Point(r["variant"], r["val_loss"], r["n_avg"], r["tokens"], r["variant"].startswith("sparse"))
           for r in rows]
    dense = scaling.fit([p for p in pts if not p.sparse])
    for r in rows:
        r["dense_law_at_n_avg"] = float(dense.predict(np.array([r["n_avg"]]))[0])
        r["dense_law_at_final"] = float(dense.predict(np.array([r["final_params"]]))[0])
    sparse = [r for r in rows if r["variant"].startswith("sparse")]
    off_avg = [r["val_loss"] - r["dense_law_at_n_avg"] for r in sparse]
    off_final = [r["val_loss"] - r["dense_law_at_final"] for r in sparse]
    best = min(sparse, key=lambda r: r["val_loss"])
    figures = {"rows": rows, "dense_fit": dense.constants, "dense_fit_formula": dense.formula(),
               "sparse_minus_dense_law_at_n_avg": {"mean": float(np.mean(off_avg)),
                                                   "max_abs": float(np.max(np.abs(off_avg)))},
               "sparse_minus_dense_law_at_final_params": {"mean": float(np.mean(off_final)),
                                                          "max_abs": float(np.max(np.abs(off_final)))},
               "best_window": best["variant"], "wall_s": round(wall)}
    write_result("sparsity", figures, fit_scaling_output=fit_output.strip().splitlines())
    lines = ["| run | final val_loss | N_avg | final non-zero params | density | dense law at N_avg | "
             "dense law at final N |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['val_loss']:.4f} | {r['n_avg'] / 1e6:.3f}M | {r['final_params'] / 1e6:.3f}M | "
              f"{r['density']:.3f} | {r['dense_law_at_n_avg']:.4f} | {r['dense_law_at_final']:.4f} |" for r in rows]
    table = "\n".join(lines)
    (Path(__file__).parent / "sparsity.table.md").write_text(
        f"Wall time: {wall / 60:.1f} min. Dense-only fit: {dense.formula()}. Sparse runs minus that law: "
        f"{np.mean(off_avg):+.4f} on average at their N_avg (largest {np.max(np.abs(off_avg)):.4f}), "
        f"{np.mean(off_final):+.4f} at their final parameter count (largest {np.max(np.abs(off_final)):.4f}).\n\n"
        f"{table}\n\n`raypt fit-scaling sweeps/papers/sparsity` over every run:\n\n```\n{fit_output.strip()}\n```\n")
    print(table)


def run() -> None:
    if not (ROOT / "data/stdlib-512/manifest.json").exists():
        raypt("data", "prepare", f"{JOBS}/base.yaml")
    raypt("tune", f"{JOBS}/sweep.yaml")


if __name__ == "__main__":
    wall = timed_unless_report("sparsity", run)
    report(wall, raypt("fit-scaling", str(SWEEP.relative_to(ROOT)), "--out", str(PNG.relative_to(ROOT)), capture=True))
