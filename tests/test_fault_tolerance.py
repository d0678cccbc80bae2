"""Worker loss, torn checkpoints and world-size changes on the shared local Ray cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raypt import checkpoint
from raypt.hooks.faults import fired
from raypt.driver import TrainingFailed, run_dir, train
from raypt.metrics.sink import read_metrics

STEPS = 8


def by_step(folder: str) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(folder) if r.get("loss") is not None}


@pytest.fixture(scope="module")
def reference(ray_cluster, make_job):
    """An uninterrupted 2-worker ZeRO-2 run that logs its sample ids."""
    cfg = make_job("run.name=ft-reference", f"train.steps={STEPS}", "checkpoint.every=2", "run.log_sample_ids=true")
    return by_step(train(cfg))


def test_sigkilled_worker_resumes_exactly(reference, make_job):
    cfg = make_job("run.name=ft-kill", f"train.steps={STEPS}", "checkpoint.every=2", "run.log_sample_ids=true",
                   "faults.kill_at_step=5", "faults.kill_rank=1", "failure.max_failures=1")
    folder = train(cfg)
    assert fired(folder, "kill")["step"] == 5
    got = by_step(folder)
    assert sorted(got) == list(range(1, STEPS + 1))
    resumed = [r for r in got.values() if "resumed_from" in r]
    # step 4's checkpoint counts only if the killed rank's async upload finished; else step 2's is the latest
    assert len(resumed) == 1 and resumed[0]["resumed_from"] in (2, 4)
    for step in range(1, STEPS + 1):
        assert abs(got[step]["loss"] - reference[step]["loss"]) <= 1e-5, step
        assert got[step]["sample_ids"] == reference[step]["sample_ids"], step
    seen = [i for step in range(1, STEPS + 1) for i in got[step]["sample_ids"]]
    assert len(seen) == len(set(seen)) == STEPS * cfg.train.global_batch, "a sample was repeated or skipped"


def test_torn_latest_checkpoint_falls_back_to_the_previous(reference, make_job):
    cfg = make_job("run.name=ft-torn", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=2",
                   "faults.corrupt_checkpoint_at_step=6", "faults.raise_at_step=7", "failure.max_failures=1")
    folder = train(cfg)
    got = by_step(folder)
    assert got[5]["resumed_from"] == 4, "the torn step-6 checkpoint must be skipped for step 4"
    assert all(abs(got[s]["loss"] - reference[s]["loss"]) <= 1e-5 for s in range(1, STEPS + 1))
    # keep-2 kept the good ones; the torn step-6 copy was replaced by the rerun's good one
    for uri in checkpoint.list_checkpoints(folder):
        checkpoint.read_state(uri)


def test_exhausted_failures_end_clearly_with_checkpoints_intact(ray_cluster, make_job):
    cfg = make_job("run.name=ft-exhaust", f"train.steps={STEPS}", "checkpoint.every=2", "checkpoint.keep=5",
                   "faults.raise_at_step=5", "failure.max_failures=0")
    with pytest.raises(TrainingFailed) as err:
        train(cfg)
    message = str(err.value)
    assert "failure.max_failures=0" in message and "injected failure at step 5" in message
    assert "step000002, step000004" in message and "resume from step000004" in message
    kept = checkpoint.list_checkpoints(run_dir(cfg))
    assert [checkpoint.read_state(u)[0].step for u in kept] == [2, 4]


def test_sigterm_commits_a_checkpoint_at_that_step(reference, make_job):
    cfg = make_job("run.name=ft-sigterm", f"train.steps={STEPS}", "checkpoint.every=4", "run.log_sample_ids=true",
                   "faults.sigterm_at_step=3", "faults.kill_rank=1", "failure.max_failures=1")
    folder = train(cfg)
    got = by_step(folder)
    assert got[4]["resumed_from"] == 3, "the SIGTERM'd step was not committed"
    assert checkpoint.read_state(f"{folder}/step000004")[0].step == 4
    for step in range(1, STEPS + 1):
        assert abs(got[step]["loss"] - reference[step]["loss"]) <= 1e-5, step
        assert got[step]["sample_ids"] == reference[step]["sample_ids"], step


@pytest.mark.parametrize("stage", [2, 3])
def test_two_worker_checkpoint_resumes_on_one_worker(reference, make_job, stage, tmp_path):
    source = make_job(f"run.name=reshard-src{stage}", f"train.steps={STEPS}", "checkpoint.every=4",
                      f"deepspeed.zero_stage={stage}")
    src = by_step(train(source))
    cfg = make_job(f"run.name=reshard-dst{stage}", f"train.steps={STEPS}", "scaling.workers=1",
                   f"deepspeed.zero_stage={stage}", f"run.resume_from={run_dir(source)}/step000004")
    got = by_step(train(cfg))
    assert min(got) == 5 and got[5]["resumed_from"] == 4 and got[5]["world_size"] == 1
    assert got[5]["samples_seen"] == src[5]["samples_seen"], "the global batch changed with the world size"
    for step in range(5, STEPS + 1):
        assert abs(got[step]["loss"] - src[step]["loss"]) <= 1e-4, (step, got[step]["loss"], src[step]["loss"])


def test_one_worker_checkpoint_resumes_on_two_workers(ray_cluster, make_job):
    source = make_job("run.name=grow-src", f"train.steps={STEPS}", "checkpoint.every=4", "scaling.workers=1")
    src = by_step(train(source))
    cfg = make_job("run.name=grow-dst", f"train.steps={STEPS}", "scaling.workers=2",
                   f"run.resume_from={run_dir(source)}/step000004")
    got = by_step(train(cfg))
    assert got[5]["resumed_from"] == 4 and got[5]["world_size"] == 2
    for step in range(5, STEPS + 1):
        assert abs(got[step]["loss"] - src[step]["loss"]) <= 1e-4, step
    state = json.load(open(os.path.join(run_dir(cfg), f"step{STEPS:06d}", "raypt_state.json")))
    assert state["world_size"] == 2 and state["samples_seen"] == STEPS * cfg.train.global_batch


@pytest.mark.slow  # it rebuilds DeepSpeed's CPU Adam op: not for the fast tier
def test_build_lock_left_by_a_killed_worker_does_not_hang_restarts(make_job):
    """A worker killed while DeepSpeed JIT-builds its ops leaves torch's plain-file lock; restarts must go on."""
    from torch.utils.cpp_extension import _get_build_directory

    from raypt.engines.device import accelerator

    os.environ.setdefault("DS_ACCELERATOR", accelerator())
    from deepspeed.accelerator import get_accelerator

    cfg = make_job("deepspeed.offload=cpu")
    builders = [get_accelerator().create_op_builder(n) for n in ("ShareMemCommBuilder", "CPUAdamBuilder")]
    locks = [os.path.join(_get_build_directory(b.name, False), "lock") for b in builders if b is not None]
    for lock in locks:
        open(lock, "w").close()
    code = ("import sys; from raypt import config; from raypt.engines import zero; "
            "zero.load_ops(config.JobConfig.model_validate_json(sys.argv[1]))")
    subprocess.run([sys.executable, "-c", code, cfg.model_dump_json()], check=True, timeout=600)
    assert not any(map(os.path.exists, locks))
