"""The pipeline engine against data parallelism on the same workers and model, and its measured bubble against
the theory, in one invocation.

The quickstart model on 2 Ray Train workers: ZeRO-0 data parallelism (2 replicas), and a 2-stage pipeline (1
replica) with 1, 2, 4 and 8 micro-batches a step, in rounds whose order reverses each time, so that this
machine's drift lands on every setting alike. Each run's figures are medians over its steps after the first.
Figures:
- pipeline_vs_dp_tokens_per_s: tokens/s of the 2-stage pipeline at 4 micro-batches over data parallelism's
  (medians over the rounds of the paired ratios)
- bubble_fraction_m{1,2,4,8}: the measured share of a stage's schedule not spent in its forward and backward
  passes (the engine's `bubble_fraction`: its gradient reduction and update left out), beside
  bubble_theory_m{M} = (S - 1) / (M + S - 1)
- stage_s_m{M}: each stage's seconds per step
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402
from raypt.driver import init_ray, train  # noqa: E402
from raypt.metrics.sink import read_metrics  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")
STORAGE = tempfile.mkdtemp(prefix="raypt-pipeline-")
STAGES = 2


def run(name: str, steps: int, *overrides: str) -> list[dict]:
    cfg = config.load(JOB, [f"train.steps={steps}", f"checkpoint.every={steps}", f"train.eval_every={steps}",
                            f"run.storage={STORAGE}", f"run.name={name}", "deepspeed.zero_stage=0", *overrides])
    return [r for r in read_metrics(train(cfg)) if r.get("loss") is not None][1:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    init_ray()
    settings = ["dp", 1, 2, 4, 8]
    runs: dict = {k: [] for k in settings}
    for i in range(args.rounds):
        for k in (settings if i % 2 == 0 else reversed(settings)):
            extra = () if k == "dp" else (f"pipeline.stages={STAGES}", f"pipeline.micro_batches={k}")
            runs[k].append(run(f"{k}-{i}", args.steps, *extra))

    def median(k, key: str) -> list[float]:
        return [statistics.median(r[key] for r in records) for records in runs[k]]

    figures = {"stages": STAGES, "workers": 2, "rounds": args.rounds, "steps": args.steps,
               "tokens_per_s_dp": statistics.median(median("dp", "tokens_per_s")),
               "tokens_per_s_pipeline_m4": statistics.median(median(4, "tokens_per_s")),
               "pipeline_vs_dp_tokens_per_s": statistics.median(
                   p / d for p, d in zip(median(4, "tokens_per_s"), median("dp", "tokens_per_s")))}
    for m in settings[1:]:
        figures[f"bubble_fraction_m{m}"] = statistics.median(median(m, "bubble_fraction"))
        figures[f"bubble_theory_m{m}"] = (STAGES - 1) / (m + STAGES - 1)
        figures[f"stage_s_m{m}"] = [statistics.median(median(m, f"stage{s}_s")) for s in range(STAGES)]
    write_result("pipeline", figures)
    print(figures)


if __name__ == "__main__":
    main()
