"""The pipeline engine on the real stack: 2-stage runs in Ray Train workers, elastic in whole replicas, one
SIGTERMed and SIGKILLed mid-run, and pipeline and ZeRO runs resuming each other's checkpoints."""
from __future__ import annotations

import pytest

from raypt.driver import train
from raypt.hooks.faults import fired
from raypt.metrics.sink import read_metrics

STEPS = 8
# The embedded cluster's 4 logical CPUs fit 3 workers of 1.3: Ray Train's elastic policy would start 3, which is
# no whole replica of 2 stages; raypt's starts 2 (raypt/elastic.py), leaving CPUs to the read tasks.
PIPELINE = ("pipeline.stages=2", "pipeline.micro_batches=2", "deepspeed.zero_stage=1", f"train.steps={STEPS}",
            "checkpoint.every=4", "run.log_sample_ids=true", "scaling.workers={min: 2, max: 4}",
            "scaling.cpus_per_worker=1.3")


def by_step(folder: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(folder) if r.get("loss") is not None}


@pytest.fixture(scope="module")
def whole(ray_cluster, make_job):
    folder = train(make_job("run.name=pipe-whole", *PIPELINE))
    return folder, by_step(folder)


def test_pipeline_run_takes_whole_replicas_and_reports_its_stages_and_bubble(whole):
    record = whole[1][STEPS]
    assert {r["world_size"] for r in whole[1].values()} == {2}
    assert record["stage0_s"] > 0 and record["stage1_s"] > 0
    assert 0 < record["bubble_fraction"] < 1
    assert len(record["sample_ids"]) == 8 and len(set(record["sample_ids"])) == 8  # one replica, the whole batch


def test_sigtermed_then_sigkilled_pipeline_run_resumes_bit_for_bit(whole, make_job):
    """SIGTERM before step 3 commits a checkpoint at that step; SIGKILL before step 6 resumes from step 4's."""
    folder = train(make_job("run.name=pipe-kill", *PIPELINE, "faults.sigterm_at_step=3", "faults.kill_at_step=6",
                            "faults.kill_rank=1", "failure.max_failures=2"))
    got, want = by_step(folder), whole[1]
    assert fired(folder, "sigterm")["step"] == 3 and fired(folder, "kill")["step"] == 6
    assert [(s, r["resumed_from"]) for s, r in sorted(got.items()) if "resumed_from" in r] == [(4, 3), (5, 4)]
    assert [got[s]["loss"] for s in range(1, STEPS + 1)] == [want[s]["loss"] for s in range(1, STEPS + 1)]
    assert [got[s]["sample_ids"] for s in range(1, STEPS + 1)] == [want[s]["sample_ids"] for s in range(1, STEPS + 1)]


def test_pipeline_and_zero2_runs_resume_each_other(whole, make_job):
    """A ZeRO-2 run on 2 data-parallel workers from the pipeline's step 4, then a pipeline run from the ZeRO run's
    step 6: every step's loss is the uninterrupted pipeline run's within 1e-4."""
    folder, want = whole
    zero = train(make_job("run.name=pipe-to-zero", f"train.steps={STEPS}", "checkpoint.every=2",
                          f"run.resume_from={folder}/step000004"))
    back = train(make_job("run.name=zero-to-pipe", *PIPELINE, f"run.resume_from={zero}/step000006"))
    for run, steps in ((by_step(zero), range(5, STEPS + 1)), (by_step(back), range(7, STEPS + 1))):
        assert sorted(run) == list(steps)
        for s in steps:
            assert abs(run[s]["loss"] - want[s]["loss"]) <= 1e-4, (s, run[s]["loss"], want[s]["loss"])
