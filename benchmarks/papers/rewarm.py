"""Re-warming reproduction (Gupta et al. 2023; Ibrahim et al. 2024): pre-train on Python, continue on C/C++ headers
under each continual schedule with equal token budgets, and tabulate forgetting (Python) and adaptation (C++).

Runs the user's commands, in order, from the repository root (each its own process and embedded cluster):
  raypt data prepare jobs/papers/rewarm/pretrain.yaml      (skipped when data/stdlib is prepared)
  raypt data prepare jobs/papers/rewarm/cpp.yaml           (skipped when data/cpp is prepared)
  raypt train jobs/papers/rewarm/pretrain.yaml
  raypt tune jobs/papers/rewarm/sweep.yaml                 (6 schedules: constant, re-warm 0.5/1/2x, replay 5/25%)
  raypt train jobs/papers/rewarm/infinite.yaml
  raypt anneal runs/papers/rewarm-infinite --tokens 122880
Writes benchmarks/papers/rewarm.table.md (the table and wall time, quoted in rewarm.md), rewarm.png (curves) and
benchmarks/results/rewarm.json. A finished step is not rerun (a run folder resumes, a sweep continues);
`--report` only rewrites the table, curves and results from the runs on disk.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import raypt_command as raypt, write_result  # noqa: E402

from raypt.metrics.sink import read_metrics as records  # noqa: E402

JOBS = "jobs/papers/rewarm"
RUNS, SWEEP = ROOT / "runs/papers", ROOT / "sweeps/papers/rewarm"
ANNEAL_TOKENS = 122880  # 30 steps of 32 x 128 tokens: 10% of the continued runs' 300-step budget




def evaluations(folder: Path, after: int = 0) -> list[dict]:
    return [r for r in records(folder) if "val_loss/cpp" in r and r["step"] >= after]


def row(name: str, evals: list[dict], pretrained: float) -> dict:
    python = [r["val_loss/python"] for r in evals]
    return {"schedule": name, "peak_python": max(python), "final_python": python[-1],
            "forgetting": python[-1] - pretrained, "final_cpp": evals[-1]["val_loss/cpp"],
            "tokens": evals[-1]["tokens_seen"]}


def arms() -> list[tuple[str, list[dict]]]:
    """(name, evaluations) of every continued run: the sweep's trials by variant, then the infinite schedule's
    main run continued by its anneal branch."""
    out = []
    for trial in sorted(SWEEP.glob("trial-*")):
        variant = json.loads((trial / "values.json").read_text())["variant"]
        out.append((variant, evaluations(trial)))
    main = evaluations(RUNS / "rewarm-infinite")
    branch = evaluations(RUNS / "rewarm-infinite-anneal-270", after=271)
    out.append(("infinite + anneal", main + branch))
    return out


def plot(curves: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, evals in curves:
        tokens = [r["tokens_seen"] / 1e6 for r in evals]
        axes[0].plot(tokens, [r["val_loss/python"] for r in evals], label=name)
        axes[1].plot(tokens, [r["val_loss/cpp"] for r in evals], label=name)
        lrs = [(r["tokens_seen"] / 1e6, r["lr"]) for r in evals if "lr" in r]
        axes[2].plot(*zip(*lrs), label=name)
    for ax, title in zip(axes, ("upstream: val_loss/python (forgetting)", "downstream: val_loss/cpp (adaptation)",
                                "learning rate")):
        ax.set_title(title)
        ax.set_xlabel("continued tokens (M)")
        ax.grid(alpha=0.3)
    axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 4.0))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(wall: float) -> None:
    """The table, curves and results of the runs on disk. Forgetting is measured from the continued runs' own
    step-0 Python loss: the same validation batches as every later evaluation (the pre-training job evaluates
    fewer)."""
    curves = arms()
    start = curves[0][1][0]["val_loss/python"]
    assert all(evals[0]["val_loss/python"] == start for _, evals in curves[:-1])  # one model, one batch set
    rows = [row(name, evals, start) for name, evals in curves]
    plot(curves, Path(__file__).with_suffix(".png"))
    write_result("rewarm", {"start_python_val_loss": start, "rows": rows, "wall_s": round(wall)})
    lines = ["| schedule | peak upstream (Python) | final upstream | forgetting | final downstream (C++) |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['schedule']} | {r['peak_python']:.3f} | {r['final_python']:.3f} | {r['forgetting']:+.3f} | "
              f"{r['final_cpp']:.3f} |" for r in rows]
    table = "\n".join(lines)
    (Path(__file__).parent / "rewarm.table.md").write_text(
        f"Continued runs' Python validation loss at their start (the pre-trained model): {start:.3f}. Wall time: "
        f"{wall / 60:.1f} min.\n\n{table}\n")
    print(table)


def main() -> None:
    if sys.argv[1:] == ["--report"]:  # again from the runs on disk, keeping the recorded wall time
        report(json.loads((ROOT / "benchmarks/results/rewarm.json").read_text())["figures"]["wall_s"])
        return
    began = time.time()
    if not (ROOT / "data/stdlib/manifest.json").exists():
        raypt("data", "prepare", f"{JOBS}/pretrain.yaml")
    if not (ROOT / "data/cpp/manifest.json").exists():
        raypt("data", "prepare", f"{JOBS}/cpp.yaml")
    raypt("train", f"{JOBS}/pretrain.yaml")
    raypt("tune", f"{JOBS}/sweep.yaml")
    raypt("train", f"{JOBS}/infinite.yaml")
    if not (RUNS / "rewarm-infinite-anneal-270" / "summary.json").exists():
        raypt("anneal", str(RUNS / "rewarm-infinite"), "--tokens", str(ANNEAL_TOKENS))
    report(time.time() - began)


if __name__ == "__main__":
    main()
