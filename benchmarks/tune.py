"""What a sweep costs over running its trials by hand, on the embedded local cluster, as ratios in one invocation.

- trial_startup_vs_train_startup: from the `raypt tune` process's start to its single trial's first step, over
  from the `raypt train` process's start to its first step (same job); medians of alternating rounds. Target <= 1.2.
- sweep_vs_sequential_wall: a 4-trial sweep at concurrency 1, over the same 4 runs launched one after another
  with `raypt train` (each its own process and cluster). Target <= 1.0.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402

LRS = [1e-3, 2e-3, 3e-3, 4e-3]


def first_step_time(folder: str) -> float:
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return next(r["time"] for r in map(json.loads, f) if r["step"] == 1)


def run(cmd: list[str]) -> tuple[float, float]:
    """(start, end) wall times of a raypt command in its own process (and so its own embedded cluster)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return start, time.time()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--job", default="jobs/quickstart.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("overrides", nargs="*", default=["train.steps=6", "train.eval_every=3", "checkpoint.every=3",
                                                     "scaling.workers=1", "model.num_layers=2"])
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="raypt-bench-tune-"))
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(config.load(args.job, args.overrides))))
    raypt = [sys.executable, "-m", "raypt"]

    def sweep_file(name: str, lrs: list[float]) -> str:
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "base": str(job), "storage": str(tmp / "sweeps"),
                                        "concurrency": 1, "search": {"train.lr": {"grid": lrs}}}))
        return str(path)

    ratios = []
    for i in range(args.rounds):  # alternating rounds: this machine's speed drifts between runs
        start, _ = run([*raypt, "train", str(job), f"run.name=start-{i}", f"run.storage={tmp / 'runs'}"])
        train_s = first_step_time(str(tmp / "runs" / f"start-{i}")) - start
        start, _ = run([*raypt, "tune", sweep_file(f"start-{i}", LRS[:1])])
        tune_s = first_step_time(str(tmp / "sweeps" / f"start-{i}" / "trial-00000")) - start
        ratios.append(tune_s / train_s)
        print(f"round {i}: first step after {train_s:.1f} s (train) and {tune_s:.1f} s (tune): {ratios[-1]:.3f}")
    sequential_start = time.time()
    for lr in LRS:
        run([*raypt, "train", str(job), f"train.lr={lr}", f"run.name=seq-{lr}", f"run.storage={tmp / 'runs'}"])
    sequential = time.time() - sequential_start
    start, end = run([*raypt, "tune", sweep_file("four", LRS)])
    write_result("tune", {
        "trial_startup_vs_train_startup": statistics.median(ratios),
        "trial_startup_vs_train_startup_rounds": ratios,
        "sweep_vs_sequential_wall": (end - start) / sequential,
        "sweep_wall_s": end - start, "sequential_wall_s": sequential, "trials": len(LRS)})


if __name__ == "__main__":
    main()
