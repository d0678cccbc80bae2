"""Refactors must not change what a run computes: the quickstart's first 50 per-step losses under ZeRO 0-3
(fp32 on CPU, 2 workers), against recorded losses (benchmarks/reference/quickstart_losses.json). They were
recorded before the engine/hook/driver split, and again (`--record`) when initialisation became a function of
each parameter's name, the one change meant to move them: ZeRO-3 alone then ran a partitioned build.

Figures: `max_abs_diff_zeroN` per stage and `max_abs_diff` over all (target <= 1e-6), `steps` compared.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402
from raypt.driver import train  # noqa: E402
from raypt.metrics.sink import read_metrics  # noqa: E402

REFERENCE = Path(__file__).resolve().parent / "reference" / "quickstart_losses.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--job", default="jobs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--record", action="store_true", help="write these losses as the new reference")
    args = ap.parse_args()
    reference = json.loads(REFERENCE.read_text())
    storage = tempfile.mkdtemp(prefix="raypt-same-losses-")
    figures, losses = {}, {}
    for stage in range(4):
        cfg = config.load(args.job, [f"train.steps={args.steps}", f"deepspeed.zero_stage={stage}",
                                     f"run.name=same-z{stage}", f"run.storage={storage}",
                                     f"checkpoint.every={args.steps}"])
        got = [r["loss"] for r in read_metrics(train(cfg)) if r.get("loss") is not None]
        want = reference[f"zero{stage}"][:args.steps]
        losses[f"zero{stage}"] = got
        figures[f"max_abs_diff_zero{stage}"] = max(abs(a - b) for a, b in zip(got, want))
    figures["max_abs_diff"] = max(figures.values())
    figures["steps"] = args.steps
    if args.record:
        REFERENCE.write_text(json.dumps(losses) + "\n")
        print(f"recorded {REFERENCE}")
        return
    write_result("same_losses", figures, losses=losses)


if __name__ == "__main__":
    main()
