"""The driver's steps on the shared local Ray cluster: a Tune trial calls the build step, another job's
checkpoints are refused, a checkpoint from before the index still resumes, the console stays readable."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from raypt import config
from raypt.driver import CONFIG_FILE, check_resumable, run_dir, train
from raypt.metrics.sink import read_metrics

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures")


def every_second_step(loop, step: int, record: dict) -> None:
    """A hook added through the build step, `(fn, every=2)`: its value reaches Tune with the step's record."""
    record["hooked_at"] = step


@pytest.fixture(scope="module")
def tuned(ray_cluster, make_job, tmp_path_factory):
    """Two Tune trials, each a 1-worker run whose checkpoints (every 3) never fall on an evaluation (every 2)."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypt.driver import build

    jobs = {lr: config.to_dict(make_job(f"run.name=tune-{lr}", "train.steps=5", "train.eval_every=2",
                                        "checkpoint.every=3", f"train.lr={lr}", "scaling.workers=1"))
            for lr in (1e-3, 3e-3)}

    def trainable(params: dict) -> None:
        build(config.from_dict(jobs[params["lr"]]), callbacks=[TuneReportCallback()],
              hooks=[(every_second_step, 2)]).fit()

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/

    tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 0.01}),
                       param_space={"lr": tune.grid_search(list(jobs))},
                       tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=2),
                       run_config=tune.RunConfig(name="driver-tune",
                                                 storage_path=str(tmp_path_factory.mktemp("tune"))))
    return tuner.fit(), {lr: config.from_dict(d) for lr, d in jobs.items()}


def test_tune_sees_val_loss_at_every_evaluation(tuned):
    results, jobs = tuned
    assert results.num_errors == 0 and len(results) == 2
    for result in results:
        rows = result.metrics_dataframe.to_dict("records")
        steps = [r["step"] for r in rows]
        assert steps == [0, 2, 3, 4, 5]  # evaluations at 0, 2, 4, 5; checkpoints at 3 and 5
        evaluated = {r["step"]: r["val_loss"] for r in rows}
        assert evaluated[3] == evaluated[2]  # a checkpoint report carries the latest of every declared metric
        assert all(isinstance(r["loss"], float) for r in rows[1:])
        assert [r["hooked_at"] for r in rows if r["step"] in (2, 4)] == [2, 4]  # a hook's own entry, in its step
        # the last committed checkpoint when step 5 reported: step 3's, or step 5's if its upload was quicker
        assert rows[-1]["checkpoint"].rsplit("/", 1)[-1] in ("step000003", "step000005")
        cfg = jobs[result.config["lr"]]
        written = read_metrics(run_dir(cfg)) if os.path.exists(os.path.join(run_dir(cfg), "metrics.jsonl")) else []
        assert written == []  # no sink: Tune alone gets the metrics


def test_auto_resuming_another_jobs_checkpoints_is_refused(tuned):
    _, jobs = tuned
    cfg = jobs[1e-3]
    assert check_resumable(cfg).endswith("step000005")
    changed = config.from_dict({**config.to_dict(cfg), "train": {**config.to_dict(cfg)["train"], "lr": 2e-3,
                                                                 "eval_every": 7}})
    with pytest.raises(config.ConfigError, match=r"train\.lr") as err:
        check_resumable(changed)
    assert "eval_every" not in str(err.value) and "run.resume_from=" in str(err.value)
    moved = config.from_dict({**config.to_dict(cfg), "data": {**config.to_dict(cfg)["data"], "prefetch_batches": 1}})
    assert check_resumable(moved)  # prefetch depth does not shape the trajectory


def test_format_1_checkpoint_resumes_with_the_losses_it_had(ray_cluster, make_job):
    expected = json.load(open(os.path.join(FIXTURE, "checkpoint_v1_losses.json")))["losses"]
    cfg = make_job("run.name=from-format-1", "train.steps=6",
                   f"run.resume_from={os.path.join(FIXTURE, 'checkpoint_v1')}")
    got = {r["step"]: r["loss"] for r in read_metrics(train(cfg)) if r.get("loss") is not None}
    assert sorted(got) == [4, 5, 6]
    for step, loss in expected.items():
        assert abs(got[int(step)] - loss) <= 1e-5, (step, got, expected)
    index = json.load(open(os.path.join(run_dir(cfg), "step000006", "raypt_state.json")))
    assert index["format"] == 2 and index["config"]["train"]["steps"] == 6
    assert all("crc32" in t and t["file"] in index["files"] for t in index["tensors"].values())


CHATTER = ("Token authentication", "Reporting training result", "Started distributed worker", "built successfully")


def test_console_shows_raypt_lines_and_chatter_goes_to_the_log(ray_cluster, make_job, tmp_path):
    import ray

    cfg = make_job("run.name=console", "train.steps=2", "scaling.workers=1", "train.eval_every=2")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(cfg)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "raypt", "train", str(job)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout + proc.stderr
    assert "run folder:" in proc.stdout and not any(c in shown for c in CHATTER), shown
    folder = run_dir(cfg)
    assert config.from_dict(yaml.safe_load(open(os.path.join(folder, CONFIG_FILE)))) == cfg
    assert os.path.getsize(os.path.join(folder, "driver.log")) > 0
