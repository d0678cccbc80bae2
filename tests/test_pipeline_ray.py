"""The pipeline engine on the real stack: 2-stage runs in Ray Train workers, one SIGKILLed mid-run."""
from __future__ import annotations

import pytest

from raypt.driver import train
from raypt.hooks.faults import fired
from raypt.metrics.sink import read_metrics

STEPS = 8
PIPELINE = ("pipeline.stages=2", "pipeline.micro_batches=2", "deepspeed.zero_stage=1", f"train.steps={STEPS}",
            "checkpoint.every=4", "run.log_sample_ids=true")


def by_step(folder: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(folder) if r.get("loss") is not None}


@pytest.fixture(scope="module")
def whole(ray_cluster, make_job):
    return by_step(train(make_job("run.name=pipe-whole", *PIPELINE)))


def test_pipeline_run_reports_its_stages_and_bubble(whole):
    record = whole[STEPS]
    assert record["stage0_s"] > 0 and record["stage1_s"] > 0
    assert 0 < record["bubble_fraction"] < 1
    assert len(record["sample_ids"]) == 8 and len(set(record["sample_ids"])) == 8  # one replica, the whole batch


def test_sigkilled_pipeline_run_resumes_bit_for_bit(whole, make_job):
    folder = train(make_job("run.name=pipe-kill", *PIPELINE, "faults.kill_at_step=6", "faults.kill_rank=1",
                            "failure.max_failures=1"))
    got = by_step(folder)
    assert fired(folder, "kill")["step"] == 6 and got[5]["resumed_from"] == 4
    assert [got[s]["loss"] for s in range(1, STEPS + 1)] == [whole[s]["loss"] for s in range(1, STEPS + 1)]
    assert [got[s]["sample_ids"] for s in range(1, STEPS + 1)] == [whole[s]["sample_ids"] for s in range(1, STEPS + 1)]
