"""Recovery after a worker is SIGKILLed mid-run, against a cold start, in one invocation.

One 2-worker quickstart run (ZeRO-2) loses rank 1 to SIGKILL at step KILL_AT. Figures:
- recovery_vs_cold_start: (kill -> end of the first resumed step) / (fit start -> end of step 1)
- lost_steps: steps computed before the kill that had to be recomputed
- checkpoint_overhead_fraction: time inside checkpoint saves / wall time of the training steps
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402
from raypt.hooks.faults import fired  # noqa: E402
from raypt.driver import init_ray, run_dir, train  # noqa: E402
from raypt.metrics.sink import read_metrics  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--every", type=int, default=40)
    ap.add_argument("--kill-at", type=int, default=100)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    overrides = [f"train.steps={args.steps}", f"checkpoint.every={args.every}", f"train.eval_every={args.steps}",
                 f"faults.kill_at_step={args.kill_at}", "faults.kill_rank=1", "failure.max_failures=1",
                 f"run.storage={tempfile.mkdtemp(prefix='raypt-recovery-')}", "run.name=recovery", *args.overrides]
    cfg = config.load(JOB, overrides)
    init_ray()
    start = time.time()
    folder = train(cfg)
    records = [r for r in read_metrics(folder) if r.get("loss") is not None]
    by_step = {r["step"]: r for r in records}
    resumed = next(r for r in records if "resumed_from" in r)
    kill = fired(run_dir(cfg), "kill")
    cold = by_step[1]["time"] - start  # (the resumed attempt rewrote steps after its checkpoint, not step 1)
    recovery = resumed["time"] - kill["time"]
    saves = sum(r.get("checkpoint_s", 0.0) for r in records)
    span = records[-1]["time"] - by_step[1]["time"] - recovery
    figures = {
        "recovery_vs_cold_start": recovery / cold,
        "recovery_s": recovery,
        "cold_start_s": cold,
        "lost_steps": kill["step"] - 1 - resumed["resumed_from"],
        "checkpoint_interval_steps": cfg.checkpoint.every,
        "checkpoint_overhead_fraction": saves / span,
        "checkpoint_save_s_mean": saves / max(1, sum("checkpoint_s" in r for r in records)),
        "step_time_s_mean": sum(r["step_time_s"] for r in records[1:]) / (len(records) - 1),
        "kill_step": kill["step"],
        "resumed_from": resumed["resumed_from"],
    }
    write_result("recovery", figures)


if __name__ == "__main__":
    main()
