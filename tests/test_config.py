"""Every user mistake exits before any cluster work with one message naming field, value and what is allowed."""
from __future__ import annotations

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
    (["train.global_batch=12", "train.micro_batch=4", "scaling.workers=2"],
     ["train.global_batch: 12", "micro_batch (4) x workers (2) = 8"]),
    (["scaling.workers={min: 3, max: 2}"], ["scaling.workers.min (3)", "<= scaling.workers.max (2)"]),
    (["model.num_heads=3"], ["model.num_heads: 3", "must divide model.hidden_size (128)"]),
    (["run.name=bad name!"], ["run.name", "'bad name!'", "pattern"]),
    (["train.schedule.name=linear"], ["train.schedule.name", "'linear'", "'cosine' or 'constant'"]),
    (["train.betas=[0.9]"], ["train.betas", "[0.9]"]),
    (["scaling.workers={min: 1}"], ["scaling.workers.max", "Field required"]),
    (["train.steps"], ["override 'train.steps'", "section.key=value"]),
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


def test_elastic_range_checks_every_world_size():
    with pytest.raises(config.ConfigError, match=r"workers \(3\)"):
        config.load(None, ["scaling.workers={min: 1, max: 4}", "train.global_batch=16", "train.micro_batch=4"],
                    check_data=False)
    ok = config.load(None, ["scaling.workers={min: 1, max: 2}"], check_data=False)
    assert ok.scaling.world_sizes() == [1, 2]


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
