"""`raypt tune`: bad sweeps fail before any trial; sweeps of real distributed trials on the shared Ray cluster."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from raypt import config
from raypt.schema import ConfigError
from raypt.tune.sweep import check_trials, load_sweep

TINY_TRIAL = ["train.steps=4", "train.eval_every=2", "checkpoint.every=2", "scaling.workers=1"]


def write_sweep(tmp_path, job_file: str, **body) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"base": job_file, "storage": str(tmp_path / "sweeps"), **body}))
    return str(path)


@pytest.fixture
def job_file(make_job, tmp_path) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(make_job(*TINY_TRIAL))))
    return str(path)


@pytest.mark.parametrize("search,extra,message", [
    ({"train.lrr": {"grid": [1e-3]}}, {}, r"search\.train\.lrr: .*unknown key.*did you mean 'lr'"),
    ({"train.lr": {"uniform": [1e-3, 2.0]}}, {}, r"search\.train\.lr: the value 2\.0 .*train\.lr"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, {}, r"loguniform: low 0 must be > 0"),
    ({"train.lr": {"normal": [0, 1]}}, {}, r"a distribution is one of"),
    ({"deepspeed.zero_stage": {"grid": [2, 5]}}, {}, r"search\.deepspeed\.zero_stage: the value 5"),
    ({"train.lr": {"grid": [1e-3]}}, {"metric": "val_acc"}, r"metric: got 'val_acc'.*runs report .*val_loss"),
    ({"train.lr": {"grid": [1e-3]}}, {"concurrency": 0}, r"concurrency: .*at least 1"),
    ({"train.lr": {"grid": [1e-3]}}, {"scheduler": {"name": "asha"}}, r"scheduler.*grace_period"),
    ({}, {"variants": {"hot run": []}}, r"variants: .*'hot run'.*variant names are"),
    ({}, {"variants": {"ok": [], "hot": ["train.lr=5"]}}, r"variants\.hot makes an invalid job.*train\.lr"),
])
def test_bad_sweeps_fail_before_any_trial(tmp_path, job_file, search, extra, message):
    with pytest.raises(ConfigError, match="(?s)" + message):
        sweep, job = load_sweep(write_sweep(tmp_path, job_file, search=search, **extra))
        check_trials(sweep, job)


def test_grid_points_must_combine_and_choices_resolve_paths(tmp_path, job_file, tiny_data):
    sweep, job = load_sweep(write_sweep(tmp_path, job_file, search={
        "train.global_batch": {"grid": [16, 1]}, "scaling.workers": {"grid": [1, 2]}}))
    point = r"(?s)grid point \{'scaling.workers': 2, 'train.global_batch': 1\}.*smaller than the largest world size"
    with pytest.raises(ConfigError, match=point):
        check_trials(sweep, job)
    here = os.path.relpath(tiny_data)
    sweep, job = load_sweep(write_sweep(tmp_path, job_file, search={"data.path": {"choice": [here]}}))
    space = check_trials(sweep, job)
    assert space["data.path"].categories == [os.path.abspath(here)]  # trials run in another directory


def test_variants_cross_the_search_and_apply_their_overrides_first(tmp_path, job_file):
    from raypt.tune.sweep import trial_raw

    variants = {"rewarm-2x": ["train.lr=6e-3", "train.schedule.name=rewarm"], "flat": ["train.schedule=constant"]}
    sweep, job = load_sweep(write_sweep(tmp_path, job_file, search={"train.lr": {"grid": [1e-3, 2e-3]}},
                                        variants=variants))
    space = check_trials(sweep, job)
    assert sorted(space["variant"]["grid_search"]) == ["flat", "rewarm-2x"]
    assert len(space["train.lr"]["grid_search"]) == 2
    raw = trial_raw(job, {"variant": "rewarm-2x", "train.lr": 1e-3}, sweep.variants)
    assert raw["train"]["lr"] == 1e-3 and raw["train"]["schedule"]["name"] == "rewarm"  # searched values win
    assert trial_raw(job, {"variant": "flat"}, sweep.variants)["train"]["schedule"] == "constant"


def test_an_exploit_copies_the_donors_checkpoint_or_its_next_if_pruned(tmp_path):
    from raypt.checkpoint import STATE, CheckpointError
    from raypt.tune.trial import _donor_copy

    donor = tmp_path / "trial-00001"
    for step in (6, 8):
        (donor / f"step{step:06d}").mkdir(parents=True)
        (donor / f"step{step:06d}" / "w.bin").write_bytes(bytes(step))
        (donor / f"step{step:06d}" / STATE).write_text(json.dumps({"step": step, "files": {"w.bin": step}}))
    run = str(tmp_path / "trial-00002")
    pointer = {"trial": "trial-00001", "uri": str(donor / "step000006"), "step": 6}
    copy, step = _donor_copy(pointer, run)
    assert (step, open(os.path.join(copy, "w.bin"), "rb").read()) == (6, bytes(6))
    assert copy.startswith(os.path.join(run, "donor") + "/")  # not a step folder of its own: no auto-resume
    (donor / "step000006" / "w.bin").unlink()  # pruned by the donor, which trains on
    copy, step = _donor_copy(pointer, run)
    assert step == 8 and os.listdir(os.path.join(run, "donor")) == ["step000008"]
    with pytest.raises(CheckpointError, match="trial-00001 kept no checkpoint at or after step 10"):
        _donor_copy({**pointer, "uri": str(donor / "step000010"), "step": 10}, run)


def test_impossible_concurrency_is_refused_with_what_fits(make_job):
    from raypt.tune.run import concurrency
    from raypt.tune.sweep import SweepConfig

    job = make_job("scaling.workers=2")  # 2 x (1 CPU + 0.5 for readers) + the trial: 3.01 CPUs
    sweep = SweepConfig(name="s", base="x", search={}, concurrency=2)
    with pytest.raises(ConfigError, match=r"concurrency: got 2; the cluster's 4 CPUs hold 1 trial"):
        concurrency(sweep, job, 4.0)
    with pytest.raises(ConfigError, match=r"one trial needs 3.01 CPUs"):
        concurrency(sweep.model_copy(update={"concurrency": "auto"}), job, 2.0)
    assert concurrency(sweep.model_copy(update={"concurrency": "auto"}), job, 8.0) == 2


def tiny_sweep(tmp, make_job, job_overrides: tuple = (), **body):
    """A sweep of the tiny job (plus overrides) in `tmp`: (sweep, base job), validated."""
    job = tmp / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(make_job(*TINY_TRIAL, *job_overrides))))
    return load_sweep(write_sweep(tmp, str(job), **body))


def sweep_rows(folder: str) -> dict[str, dict]:
    from raypt.tune.results import trials
    from raypt.tune.sweep import SweepConfig

    sweep = SweepConfig.model_validate(yaml.safe_load(open(os.path.join(folder, "sweep.yaml"))))
    return {r["trial"]: r for r in trials(sweep)}


def records(folder: str, trial: str) -> list[dict]:
    from raypt.metrics.sink import read_metrics

    return read_metrics(os.path.join(folder, trial))


@pytest.fixture(scope="module")
def grid(ray_cluster, make_job, tmp_path_factory):
    """A grid of two 1-worker trials (peak LR) at once, tracked in a local MLflow store (how grid points cross is
    the unit tests' business)."""
    from raypt.tune.run import run_sweep

    tmp = tmp_path_factory.mktemp("grid")
    sweep, base = tiny_sweep(tmp, make_job, ("run.trackers=[tensorboard,mlflow]",), name="grid", search={
        "train.lr": {"grid": [1e-3, 3e-3]}})
    store = {"MLFLOW_TRACKING_URI": f"file:{tmp / 'mlruns'}", "MLFLOW_ALLOW_FILE_STORE": "true",
             "MLFLOW_DISABLE_TELEMETRY": "true"}
    saved = {k: os.environ.get(k) for k in store}
    os.environ.update(store)
    try:
        return run_sweep(sweep, base), tmp
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def test_grid_sweep_writes_table_curves_and_a_runnable_best_job(grid, make_job):
    from raypt.driver import train
    from raypt.metrics.sink import read_metrics

    folder, tmp = grid
    rows = sweep_rows(folder)
    assert len(rows) == 2 and all(r["status"] == "finished" and r["step"] == 4 for r in rows.values())
    assert sorted(r["train.lr"] for r in rows.values()) == [1e-3, 3e-3]
    table = open(os.path.join(folder, "results.md")).read()
    assert all(name in table for name in rows) and "final_val_loss" in table
    assert len(open(os.path.join(folder, "results.csv")).read().strip().splitlines()) == 3
    assert open(os.path.join(folder, "curves.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    best = min(rows.values(), key=lambda r: r["final_val_loss"])
    cfg = config.load(os.path.join(folder, "best.yaml"), [f"run.storage={tmp / 'best'}"])
    assert cfg.train.lr == best["train.lr"]
    assert not os.path.exists(os.path.join(folder, best["trial"], "export"))  # trials do not export
    again = [r["val_loss"] for r in read_metrics(train(cfg)) if "val_loss" in r]
    assert abs(again[-1] - best["final_val_loss"]) <= 1e-5  # the best job reproduces its trial
    shown = subprocess.run([sys.executable, "-m", "raypt", "tune", "show", folder], capture_output=True, text=True)
    assert shown.returncode == 0 and all(name in shown.stdout for name in rows)


def test_sweep_logged_to_mlflow_holds_one_run_per_trial(grid, monkeypatch):
    from mlflow.tracking import MlflowClient

    folder, tmp = grid
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store in maintenance mode
    client = MlflowClient(tracking_uri=f"file:{tmp / 'mlruns'}")
    experiment = client.get_experiment_by_name("grid")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == sorted(sweep_rows(folder))
    for name, run in runs.items():
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_loss")}
        assert sorted(history) == [0, 2, 4]
        assert history[4] == records(folder, name)[-1]["val_loss"]
        assert float(run.data.params["train.lr"]) == sweep_rows(folder)[name]["train.lr"]


def test_asha_stops_the_worse_trials_and_every_resource_returns(ray_cluster, make_job, tmp_path):
    import ray

    from raypt.tune.run import run_sweep

    sweep, base = tiny_sweep(tmp_path, make_job, ("train.steps=6",), name="asha", concurrency=2,
                             scheduler={"name": "asha", "grace_period": 2, "reduction_factor": 2},
                             search={"train.lr": {"grid": [1e-4, 3e-3, 1e-5, 2e-3]}})
    folder = run_sweep(sweep, base)
    status = json.load(open(os.path.join(folder, "trials.json")))
    assert sorted(status.values()).count("stopped early") >= 1 and "failed" not in status.values()
    rows = sweep_rows(folder)
    stopped = [r for r in rows.values() if r["status"] == "stopped early"]
    assert all(2 <= r["step"] < 6 for r in stopped)
    total = ray.cluster_resources()
    for _ in range(300):  # placement groups of stopped trials are released asynchronously: bounded wait
        if ray.available_resources().get("CPU") == total["CPU"]:
            break
        subprocess.run(["sleep", "0.1"])
    assert ray.available_resources().get("CPU") == total["CPU"]
    assert not [pg for pg in ray.util.placement_group_table().values() if pg["state"] == "CREATED"]


def test_killed_sweep_driver_continues_without_rerunning_finished_trials(ray_cluster, make_job, tmp_path):
    import ray

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(make_job(*TINY_TRIAL, "train.steps=50", "checkpoint.every=5",
                                                          "train.eval_every=100"))))
    path = write_sweep(tmp_path, str(job), name="killed", concurrency=1,
                       search={"train.steps": {"grid": [4, 50]}})
    folder = str(tmp_path / "sweeps" / "killed")
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "raypt", "tune", path]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    from raypt.checkpoint import latest_good

    def long_trial_checkpointed() -> bool:
        rows = sweep_rows(folder) if os.path.exists(os.path.join(folder, "sweep.yaml")) else {}
        long = [t for t, r in rows.items() if (r["job"].get("train") or {}).get("steps") == 50]
        return bool(long) and latest_good(os.path.join(folder, long[0]), log=lambda m: None) is not None
    try:
        while not long_trial_checkpointed():
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=0.5)  # the sweep must still be going while we wait
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    rows = sweep_rows(folder)
    short = next(t for t, r in rows.items() if r["job"]["train"]["steps"] == 4)
    long = next(t for t, r in rows.items() if r["job"]["train"]["steps"] == 50)
    finished_before = records(folder, short)
    assert finished_before[-1]["step"] == 4
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "continuing sweep killed" in done.stdout + done.stderr
    assert records(folder, short) == finished_before  # not re-run
    steps = [r["step"] for r in records(folder, long)]
    assert steps == list(range(51)), "each step of the interrupted trial recorded once"
    resumed = [r for r in records(folder, long) if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] >= 5
    assert json.load(open(os.path.join(folder, "trials.json"))) == {short: "finished", long: "finished"}


def test_trial_faults_recover_inside_or_fail_after_retries(ray_cluster, make_job, tmp_path):
    from raypt.tune.run import run_sweep

    sweep, base = tiny_sweep(tmp_path, make_job, ("failure.max_failures=1",), name="faults", trial_failures=1,
                             search={"faults": {"grid": [{"kill_at_step": 4}, {"raise_at_step": 2, "repeat": True}]}})
    folder = run_sweep(sweep, base)
    rows = sweep_rows(folder)
    killed = next(r for r in rows.values() if r["job"]["faults"]["kill_at_step"] == 4)
    failing = next(r for r in rows.values() if r["job"]["faults"]["repeat"])
    assert killed["status"] == "finished" and killed["step"] == 4
    assert [r["resumed_from"] for r in records(folder, killed["trial"]) if "resumed_from" in r] == [2]
    assert failing["status"] == "failed"
    assert "faults.raise_at_step" in open(os.path.join(folder, failing["trial"], "error.txt")).read()


def test_pbt_exploit_continues_from_the_donors_weights_and_data(ray_cluster, make_job, tmp_path):
    from raypt.tune.run import run_sweep

    # The whole population at once (PBT pauses every trial at each interval while any waits for resources):
    # fractional workers, so both 1-worker trials and their readers fit the cluster's 4 logical CPUs. Of two
    # trials, the worse one (its LR too small to learn) continues from the better at step 4 (of 6); synchronous, so that
    # it does not depend on which trial starts first (asynchronous PBT skips a decision while a trial has no
    # score yet).
    sweep, base = tiny_sweep(tmp_path, make_job, ("train.steps=6", "scaling.cpus_per_worker=0.45"), name="pbt",
                             concurrency=2, scheduler={"name": "pbt", "interval": 4, "quantile_fraction": 0.5,
                                                       "synch": True},
                             search={"train.lr": {"grid": [1e-5, 3e-3]}})
    folder = run_sweep(sweep, base)
    rows = sweep_rows(folder)
    exploits = [(t, r) for t in rows for r in records(folder, t) if "continued_from" in r]
    assert exploits, "no trial continued from another"
    for trial, first in exploits:
        donor = first["continued_from"]
        assert donor["trial"] != trial and set(donor["values"]) == {"train.lr"}
        assert f"<-{donor['trial']}@{donor['step']}" in rows[trial]["lineage"]
        if donor["step"] == 6:  # a donor's last checkpoint (a tie at the end): nothing is left to train
            assert first["step"] == 6 and "loss" not in first
            continue
        assert first["step"] == donor["step"] + 1
        donor_loss = next(r["loss"] for r in records(folder, donor["trial"]) if r["step"] == first["step"])
        assert abs(first["loss"] - donor_loss) <= 1e-4  # the donor's weights and data position, before its LR acts
    failed = {t: open(os.path.join(folder, t, "error.txt")).read()[-2000:] for t, r in rows.items()
              if r["status"] != "finished"}
    assert not failed, failed
