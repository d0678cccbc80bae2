"""Every user mistake exits before any cluster work with one message naming field, value and what is allowed."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from raypt import config

BAD = [
    (["train.stepz=10"], ["train.stepz", "unknown key", "did you mean 'steps'"]),
    (["trian.steps=10"], ["trian", "unknown key", "did you mean 'train'"]),
    (["train.steps=ten"], ["train.steps", "'ten'", "integer"]),
    (["train.steps=0"], ["train.steps", "0", "greater than or equal to 1"]),
    (["train.lr=-1"], ["train.lr", "-1", "greater than 0"]),
    (["deepspeed.zero_stage=4"], ["deepspeed.zero_stage", "4", "0, 1, 2 or 3"]),
    (["deepspeed.offload=nvme"], ["deepspeed.offload", "'nvme'", "'none' or 'cpu'"]),
    (["train.global_batch=3", "scaling.workers={min: 2, max: 4}"],
     ["train.global_batch: 3", "largest world size (4 workers)", "train.global_batch >= 4"]),
    (["scaling.workers={min: 3, max: 2}"], ["scaling.workers.min (3)", "<= scaling.workers.max (2)"]),
    (["model.num_heads=3"], ["model.num_heads: 3", "must divide model.hidden_size (128)"]),
    (["run.name=bad name!"], ["run.name", "'bad name!'", "pattern"]),
    (["train.schedule.name=step"], ["train.schedule.name", "'step'", "'cosine', 'constant', 'linear'",
                                     "'inverse-sqrt' or 'infinite'"]),
    (["train.betas=[0.9]"], ["train.betas", "[0.9]"]),
    (["train.betas=[0.9, 1.0]"], ["train.betas.1: got 1.0", "less than 1"]),
    (["scaling.workers=0"], ["scaling.workers: got 0", "greater than or equal to 1"]),
    (["scaling.workers={min: 1}"], ["scaling.workers.max", "Field required"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay: got -0.1", "greater than or equal to 0"]),
    (["train.eps=0"], ["train.eps: got 0", "greater than 0"]),
    (["checkpoint.keep=0"], ["checkpoint.keep: got 0", "greater than or equal to 1"]),
    (["data.prefetch_batches=-1"], ["data.prefetch_batches: got -1", "greater than or equal to 0"]),
    (["data.image.crop_scale=[0.9, 0.5]"], ["data.image.crop_scale: got [0.9, 0.5]", "low <= high"]),
    (["data.image.crop_scale=[0, 1]"], ["data.image.crop_scale.0: got 0", "greater than 0"]),
    (["data.image.std=[0.2, 0.2, 0]"], ["data.image.std.2: got 0", "greater than 0"]),
    (["data.image.mean=[0.5, 1.5, 0.5]"], ["data.image.mean.1: got 1.5", "less than or equal to 1"]),
    (["model.mask_ratio=0.5"], ["model.mask_ratio: not a field of model.task 'clm' (it is a field of 'mae')",
                                "allowed keys: task, hidden_size"]),
    (["model.task=mae", "model.rope_theta=1"], ["model.rope_theta: not a field of model.task 'mae'",
                                                "(it is a field of 'clm', 'multimodal')"]),
    (["model.task=mae", "model.mask_ratio=1"], ["model.mask_ratio: got 1", "less than 1"]),
    (["model.task=gpt"], ["model.task: got 'gpt'", "'clm', 'contrastive', 'mae' or 'multimodal'"]),
    (["model.hidden_sise=64"], ["model.hidden_sise: unknown key", "did you mean 'hidden_size'"]),
    (["train.schedule.name=constant", "train.schedule.min_lr_ratio=0.2"],
     ["train.schedule.min_lr_ratio: not a field of train.schedule.name 'constant' (it is a field of 'cosine', "
      "'linear'"]),
    (["train.steps"], ["override 'train.steps'", "section.key=value"]),
    (["run.trackers=[foo]"], ["run.trackers.0: got 'foo'", "'tensorboard', 'mlflow' or 'wandb'"]),
    (["run.trackers=[mlflow, tensorboard, mlflow]"], ["run.trackers", "lists mlflow more than once",
                                                      "allowed: tensorboard, mlflow, wandb"]),
    (["fast.compile=true", "deepspeed.zero_stage=3"], ["fast.compile: true", "deepspeed.zero_stage 3",
                                                       "use zero_stage 0-2"]),
    (["fast.pin_memory=true", "scaling.use_gpu=false"], ["fast.pin_memory: true needs GPU workers",
                                                         "scaling.use_gpu is false"]),
    (["fast.fused_optimizer=true", "deepspeed.offload=cpu"], ["fast.fused_optimizer: true",
                                                              "deepspeed.offload cpu", "CPU Adam"]),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_field_value_and_allowed(overrides, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, overrides, check_data=False)
    for fragment in expected:
        assert fragment in str(err.value)


def test_missing_data_path_is_reported(tmp_path):
    with pytest.raises(config.ConfigError, match=r"data.path: '.*nowhere' holds no prepared dataset"):
        config.load(None, [f"data.path={tmp_path / 'nowhere'}"])


def test_missing_and_malformed_job_files(tmp_path):
    with pytest.raises(config.ConfigError, match="job file: .* does not exist"):
        config.load(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)


def test_any_elastic_range_the_batch_covers_is_accepted():
    ok = config.load(None, ["scaling.workers={min: 2, max: 8}", "train.global_batch=16", "train.micro_batch=4"],
                     check_data=False)
    assert ok.scaling.world_sizes() == [2, 3, 4, 5, 6, 7, 8]


def test_cli_error_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "raypt", "train", "jobs/quickstart.yaml", "deepspeed.zero_stage=5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "deepspeed.zero_stage: got 5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_config_show_prints_resolved_defaults():
    proc = subprocess.run([sys.executable, "-m", "raypt", "config", "show", "jobs/quickstart.yaml", "train.steps=7"],
                          capture_output=True, text=True, check=True)
    import yaml

    shown = yaml.safe_load(proc.stdout)
    assert shown["train"]["steps"] == 7
    assert shown["train"]["schedule"]["min_lr_ratio"] == 0.1  # a default the job file does not set
    assert shown["deepspeed"]["zero_stage"] == 2


def test_every_job_in_jobs_validates():
    from pathlib import Path

    jobs = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.yaml"))
    assert len(jobs) >= 3
    for job in jobs:
        cfg = config.load(job, check_data=False)
        assert cfg.run.name, job


def test_paths_are_absolute_and_stay_so_on_another_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None, ["data.sources=[{name: a, path: data/a, prepare: {inputs: [raw/*.txt, s3://b/x]}}]",
                             "run.resume_from=old/step000100", "data.prepare.tokenizer=data/a",
                             "run.storage=s3://b/runs"], check_data=False)
    assert cfg.data.path == str(tmp_path / "data/stdlib") and cfg.data.sources[0].path == str(tmp_path / "data/a")
    assert cfg.data.sources[0].prepare.inputs == [str(tmp_path / "raw/*.txt"), "s3://b/x"]
    assert cfg.data.prepare.tokenizer == str(tmp_path / "data/a")
    assert cfg.run.resume_from == str(tmp_path / "old/step000100") and cfg.run.storage == "s3://b/runs"
    (tmp_path / "worker").mkdir()
    monkeypatch.chdir(tmp_path / "worker")  # a Ray worker runs elsewhere: the dict keeps the driver's paths
    assert config.from_dict(config.to_dict(cfg)) == cfg


def test_load_leaves_the_environment_alone(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    cfg = config.load(None, ["s3.endpoint=http://127.0.0.1:9"], check_data=False)
    assert "AWS_ENDPOINT_URL" not in os.environ and cfg.s3.env() == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}


def test_trajectory_ignores_how_a_run_executes_and_catches_what_it_computes():
    mix = "data.sources=[{{name: a, path: {}, weight: {}}}, {{name: b, path: /data/b}}]"
    base = config.load(None, [mix.format("/data/a", 2)], check_data=False)
    same = config.load(None, [mix.format("s3://bucket/a", 2), "data.prefetch_batches=0", "train.eval_every=7",
                              "train.eval_batches=1", "train.steps=999", "checkpoint.every=3", "scaling.workers=1",
                              "deepspeed.zero_stage=3", "run.storage=/elsewhere", "faults.kill_at_step=5",
                              "train.global_batch=16", "run.trackers=[mlflow, wandb]", "run.group=sweep"],
                       check_data=False)
    assert same.trajectory() == base.trajectory() and same.digest() == base.digest()
    assert len(base.digest()) == 16 and int(base.digest(), 16) >= 0
    other = config.load(None, [mix.format("/data/a", 3), "train.lr=1e-3"], check_data=False)
    assert other.digest() != base.digest()
    assert config.trajectory_diff(base.trajectory(), other.trajectory()) == ["data.sources.0.weight", "train.lr"]
    assert config.trajectory_diff(base.trajectory(), base.trajectory()) == []
    mae = config.load(None, ["model.task=mae"], check_data=False)
    assert "model.task" in config.trajectory_diff(base.trajectory(), mae.trajectory())


def test_explain_lists_fields_with_types_bounds_defaults_and_meaning():
    train = config.explain("train")
    assert "betas: [float in [0, 1), float in [0, 1)] = [0.9, 0.95]" in train
    assert "eps: float > 0 = 1e-08" in train and "AdamW's term added to the denominator" in train
    assert "schedule: one of 'cosine', 'constant', 'linear', '1-sqrt', 'rewarm', 'wsd', 'inverse-sqrt', 'infinite' " \
           "by train.schedule.name (default 'cosine')" in train
    assert "name: 'constant':" in train and "min_lr_ratio: float in [0, 1] = 0.1" in train  # its sub-sections too
    model = config.explain("model")
    assert all(f"task: {t!r}:" in model for t in ("clm", "contrastive", "mae", "multimodal"))
    assert "mask_ratio: float in (0, 1) = 0.75" in model and "\ndata.image:" not in model
    whole = config.explain()
    for section in ("run:", "model:", "data.sources:", "data.image:", "train.schedule:", "scaling.workers:", "s3:"):
        assert f"\n{section}" in "\n" + whole
    assert "workers: int >= 1 or {min, max} = 2" in whole and "storage: path or URI = 'runs'" in whole
    with pytest.raises(config.ConfigError, match="no section 'trian'; sections: run, run.init_from, model, data"):
        config.explain("trian")
    proc = subprocess.run([sys.executable, "-m", "raypt", "config", "explain", "train.schedule"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout == config.explain("train.schedule")


def test_config_imports_no_torch_transformers_or_ray():
    code = ("import sys, raypt.config; heavy = {m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'ray', 'deepspeed', 'PIL', 'soundfile'}; print(sorted(heavy))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
