"""Worker loss, torn checkpoints and world-size changes on the shared local Ray cluster."""
from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from raypt import checkpoint, console
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


def test_sigtermed_then_sigkilled_worker_resumes_exactly(reference, make_job):
    """SIGTERM before step 3 commits a checkpoint at that step (checkpoints are every 2); SIGKILL before step 7
    resumes from the newest checkpoint; every step's loss and samples are the uninterrupted run's."""
    cfg = make_job("run.name=ft-kill", f"train.steps={STEPS}", "checkpoint.every=2", "run.log_sample_ids=true",
                   "faults.sigterm_at_step=3", "faults.kill_at_step=7", "faults.kill_rank=1",
                   "failure.max_failures=2")
    folder = train(cfg)
    assert fired(folder, "sigterm")["step"] == 3 and fired(folder, "kill")["step"] == 7
    got = by_step(folder)
    assert sorted(got) == list(range(1, STEPS + 1))
    resumed = [(s, r["resumed_from"]) for s, r in sorted(got.items()) if "resumed_from" in r]
    # step 6's checkpoint counts only if the killed rank's async upload finished; else step 4's is the newest
    assert resumed[0] == (4, 3) and resumed[1:] in ([(5, 4)], [(7, 6)]), resumed
    for step in range(1, STEPS + 1):
        assert abs(got[step]["loss"] - reference[step]["loss"]) <= 1e-5, step
        assert got[step]["sample_ids"] == reference[step]["sample_ids"], step
    seen = [i for step in range(1, STEPS + 1) for i in got[step]["sample_ids"]]
    assert len(seen) == len(set(seen)) == STEPS * cfg.train.global_batch, "a sample was repeated or skipped"


def test_sigkilled_worker_resumes_from_its_in_memory_snapshot(reference, make_job, monkeypatch):
    """Snapshots every step, a durable checkpoint only at the end: a kill at a random step loses at most one."""
    kill = random.randint(3, STEPS - 1)
    monkeypatch.setattr(console, "_console", shown := io.StringIO())
    cfg = make_job("run.name=ft-memory", f"train.steps={STEPS}", f"checkpoint.every={STEPS}",
                   "checkpoint.memory_every=1", "run.log_sample_ids=true", f"faults.kill_at_step={kill}",
                   "faults.kill_rank=1", "failure.max_failures=1")
    got = by_step(train(cfg))
    resumed = [r for r in got.values() if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0].get("resumed_from_memory"), (kill, resumed)
    assert kill - 1 - resumed[0]["resumed_from"] <= 1, f"killed at step {kill}, resumed from {resumed}"
    assert f"resuming from the in-memory snapshot of step {resumed[0]['resumed_from']}" in shown.getvalue()
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in sorted(got)] == [reference[s]["loss"] for s in sorted(got)], kill  # bit for bit
    assert [got[s]["sample_ids"] for s in sorted(got)] == [reference[s]["sample_ids"] for s in sorted(got)]
    assert "memory_snapshot_s" in got[STEPS]


def kill_snapshot_holders(loop, step: int, record: dict) -> None:
    """A drill: the holders of this node's in-memory snapshots go, as they would with their node (on one node, the
    registry is that holder)."""
    import ray

    if loop.rank == 0:
        try:
            holders = ray.get(loop.snapshots.holders_for.remote(ray.get_runtime_context().get_node_id()))
        except ray.exceptions.RayError:  # gone already: the resumed attempt passes this step again
            return
        for _, holder in holders:
            ray.kill(holder)


def test_snapshot_without_a_live_holder_falls_back_to_the_durable_checkpoint(reference, make_job, monkeypatch):
    """Every holder goes at step 6 (the one node's, which is the registry), a worker at step 7: the durable step-4
    checkpoint restores (the snapshot of step 5, or 6, was being handed over as the holders went)."""
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    monkeypatch.setattr(console, "_console", shown := io.StringIO())
    cfg = make_job("run.name=ft-memory-lost", f"train.steps={STEPS}", "checkpoint.every=4",
                   "checkpoint.memory_every=1", "faults.kill_at_step=7", "faults.kill_rank=1",
                   "failure.max_failures=1")
    got = by_step(train(cfg, hooks=((kill_snapshot_holders, 6),)))
    resumed = [r for r in got.values() if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] == 4 and not resumed[0].get("resumed_from_memory")
    text = shown.getvalue()
    assert "the in-memory snapshot registry is gone, and the shares its node held with it" in text, text
    assert "resuming from the durable checkpoints" in text, text
    assert all(abs(got[s]["loss"] - reference[s]["loss"]) <= 1e-5 for s in range(1, STEPS + 1))


def test_snapshot_over_its_limit_is_named_and_the_run_goes_on(ray_cluster, make_job, monkeypatch):
    monkeypatch.setattr(console, "_console", shown := io.StringIO())
    cfg = make_job("run.name=ft-memory-limit", "train.steps=2", "scaling.workers=1", "checkpoint.memory_every=1",
                   "checkpoint.memory_limit_gb=1e-6")
    got = by_step(train(cfg))
    assert sorted(got) == [1, 2]
    assert "checkpoint.memory_limit_gb=1e-06: a snapshot share of" in shown.getvalue(), shown.getvalue()
    assert "in-memory snapshots are off for this attempt" in shown.getvalue()


@pytest.mark.slow  # bf16 on CPU is slow
def test_sigkilled_bf16_run_resumes_bit_for_bit(ray_cluster, make_job):
    """DeepSpeed's CPU accelerator trains in bf16: the fp32 masters and Adam moments come back exactly after the
    engine is built, and other randomness follows (seed, rank, step), so the losses match to the last bit."""
    common = ("deepspeed.precision=bf16", "train.steps=6", "checkpoint.every=2")
    whole = by_step(train(make_job("run.name=bf16-whole", *common)))
    folder = train(make_job("run.name=bf16-kill", *common, "faults.kill_at_step=5", "faults.kill_rank=1",
                            "failure.max_failures=1"))
    got = by_step(folder)
    assert fired(folder, "kill")["step"] == 5 and any("resumed_from" in r for r in got.values())
    assert [got[s]["loss"] for s in range(1, 7)] == [whole[s]["loss"] for s in range(1, 7)]


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


def test_two_worker_zero3_checkpoint_resumes_on_one_worker(reference, make_job):
    """Through run.resume_from and the whole driver (the gloo tier resumes every stage at 1-4 ranks; the elastic
    drill shrinks and grows a run)."""
    stage = 3
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


# --- hangs and non-finite losses (issue 12, point 5) -------------------------------------------------------------

def veto_nonfinite(rank: int, world: int, out_dir: str) -> dict:
    """Gloo tier: per ZeRO stage, a step whose loss is NaN on rank 1 only, under train.on_nonfinite=skip."""
    from types import SimpleNamespace

    from gloo import build, job, rank_batches
    from raypt.hooks.faults import nan_output
    from raypt.hooks.nonfinite import NonFinite

    out = {}
    for stage in (0, 2, 3):
        task, engine = build(job(stage), world, rank)
        policy = NonFinite("skip", out_dir, rank)
        policy.start(SimpleNamespace(engine=engine), None)  # the loop: all the skip policy reads of it

        def step(n: int, poison: bool = False) -> tuple[float, bool]:
            policy.before_step(None, n)
            hook = engine.module.register_forward_hook(lambda m, a, o: nan_output(o)) if poison else None
            loss, _ = engine.train_step(rank_batches(n, engine.split, engine.dp_rank), task.loss)
            if hook is not None:
                hook.remove()
            return float(loss), policy.skipped

        def state() -> dict:
            return {k: t.clone() for k, _, t in engine.state_tensors() if t is not None}

        step(1)
        before, adam = state(), engine.optimizer_steps()
        loss, skipped = step(2, poison=rank == 1)
        after = state()
        out[stage] = {"loss": loss, "skipped": skipped, "adam": [adam, engine.optimizer_steps()],
                      "unchanged": all(torch.equal(before[k], after[k]) for k in before),
                      "next": [step(3), step(4)]}
    return out


@pytest.mark.slow  # three ZeRO stages on two ranks: with the Ray tier, so the fast tier stays quick
def test_vetoed_update_leaves_weights_and_adam_state_untouched(tmp_path):
    from gloo import run_group

    for rank, got in enumerate(run_group(2, veto_nonfinite, str(tmp_path))):
        for stage, s in got.items():
            assert math.isnan(s["loss"]) == (rank == 1), (rank, stage, "only rank 1's loss is NaN")
            assert s["skipped"], (rank, stage, "every rank must agree to skip")
            assert s["unchanged"], (rank, stage, "weights or Adam moments moved on a skipped update")
            assert s["adam"] == [1, 1], (rank, stage, "Adam's step counter moved on a skipped update")
            assert all(math.isfinite(loss) and not skipped for loss, skipped in s["next"]), (rank, stage)


def test_fp16_loss_scale_round_trips_through_the_checkpoint_state():
    """fp16 does not train on DeepSpeed's CPU accelerator here ("Type fp16 is not supported on your device"), so
    this checks the saved state on DeepSpeed's own scaler objects: a fresh scaler given the state of one that has
    seen overflows makes the same decisions from then on."""
    from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler, LossScaleConfig

    from raypt.hooks.loss_scale import read, write

    args = {"init_scale": 2.0 ** 16, "scale_window": 100, "min_scale": 1.0, "delayed_shift": 2,
            "consecutive_hysteresis": False}  # what ds_config's fp16 section gives DeepSpeed

    def zero_scaler():  # what ZeRO 1-3 keep as optimizer.loss_scaler
        return CreateLossScaler(torch.float16, static_loss_scale=1.0, dynamic_scaling=True, dynamic_loss_args=args)

    def fp16_config():  # what the ZeRO-0 fp16 optimizer keeps as optimizer.loss_scale_config
        return LossScaleConfig(torch.float16, dynamic_loss_scale=True, static_loss_scale=1.0,
                               dynamic_loss_args={k: args[k] for k in ("init_scale", "scale_window", "min_scale")})

    for make in (zero_scaler, fp16_config):
        trained = make()
        write(trained, {"cur_scale": 512.0, "cur_iter": 1037, "last_overflow_iter": 40, "cur_hysteresis": 1})
        fresh = make()
        assert read(fresh) != read(trained)
        write(fresh, json.loads(json.dumps(read(trained))))  # as the checkpoint's JSON carries it
        assert read(fresh) == read(trained)
    ref = zero_scaler()
    write(ref, {"cur_scale": 512.0, "cur_iter": 1037, "last_overflow_iter": 40, "cur_hysteresis": 1})
    restored = zero_scaler()
    write(restored, json.loads(json.dumps(read(ref))))
    for _ in range(2 * ref.scale_window):  # no overflow: the scale grows at the same iterations
        ref.update_scale(False)
        restored.update_scale(False)
        assert restored.cur_scale == ref.cur_scale
    assert ref.cur_scale > 512.0


def test_nan_loss_stop_fails_naming_the_step_with_checkpoints_intact(ray_cluster, make_job):
    cfg = make_job("run.name=nan-stop", "train.steps=6", "checkpoint.every=2", "checkpoint.keep=5",
                   "faults.nan_loss_at_step=5", "faults.kill_rank=1")
    with pytest.raises(TrainingFailed) as err:
        train(cfg)
    assert "train.on_nonfinite=stop: the loss of step 5 is NaN or infinite on 1 of 2 ranks" in str(err.value)
    kept = checkpoint.list_checkpoints(run_dir(cfg))
    assert [checkpoint.read_state(u)[0].step for u in kept] == [2, 4]


def test_nan_loss_skip_skips_the_update_and_trains_on(ray_cluster, make_job):
    # ZeRO-0 in fp32: DeepSpeed itself would apply the NaN update (ZeRO 1-3 check gradients for overflow)
    cfg = make_job("run.name=nan-skip", "train.steps=6", "checkpoint.every=6", "deepspeed.zero_stage=0",
                   "faults.nan_loss_at_step=3", "faults.kill_rank=1", "train.on_nonfinite=skip")
    folder = train(cfg)
    got = by_step(folder)
    assert fired(folder, "nan")["rank"] == 1
    assert [s for s, r in got.items() if r.get("update_skipped")] == [3]
    assert math.isnan(got[3]["loss"])
    assert all(math.isfinite(got[s]["loss"]) for s in (1, 2, 4, 5, 6)), "a NaN update reached the weights"
    assert checkpoint.read_state(f"{folder}/step000006")[1]["optimizer_step"] == 5


def test_nan_loss_rollback_resumes_from_the_last_checkpoint_and_skips_the_batch(ray_cluster, make_job):
    from raypt.hooks.nonfinite import skipped_steps

    cfg = make_job("run.name=nan-rollback", "train.steps=6", "checkpoint.every=2", "faults.nan_loss_at_step=5",
                   "faults.kill_rank=1", "train.on_nonfinite=rollback", "failure.max_failures=1")
    folder = train(cfg)
    got = by_step(folder)
    assert skipped_steps(folder) == [5]
    assert sorted(got) == list(range(1, 7)) and got[5]["resumed_from"] == 4
    assert got[5]["update_skipped"] == 1 and all(math.isfinite(r["loss"]) for r in got.values())
    assert checkpoint.read_state(f"{folder}/step000006")[1]["optimizer_step"] == 5


@pytest.mark.slow  # waits out the watchdog's limit
def test_hung_rank_restarts_within_the_step_timeout(ray_cluster, make_job):
    timeout = 20
    cfg = make_job("run.name=hang", "train.steps=6", "checkpoint.every=2", "faults.hang_at_step=4",
                   "faults.kill_rank=1", f"failure.step_timeout_s={timeout}", "failure.max_failures=1")
    folder = train(cfg)
    got = by_step(folder)
    hung = fired(folder, "hang")
    assert hung["rank"] == 1 and hung["step"] == 4
    assert sorted(got) == list(range(1, 7)) and got[3]["resumed_from"] == 2
    # the watchdog ends the stuck worker after `timeout` s; the restart then resumes within a worker group's start
    assert timeout <= got[3]["time"] - hung["time"] <= timeout + 60
