"""Runs whose storage is S3 (moto's server on 127.0.0.1): checkpoints, restore after a failure, run files."""
from __future__ import annotations

import json

import boto3
import pyarrow.fs as pafs

from raypt import checkpoint, storage
from raypt.driver import train


def test_run_on_s3_checkpoints_restores_and_uploads_its_files(ray_cluster, s3_endpoint, make_job, monkeypatch,
                                                            tmp_path):
    boto3.client("s3").create_bucket(Bucket="raypt-runs")
    monkeypatch.chdir(tmp_path)
    cfg = make_job("run.storage=s3://raypt-runs/runs", "run.name=on-s3", "train.steps=6", "checkpoint.every=3",
                   "faults.raise_at_step=5", "failure.max_failures=1")
    folder = train(cfg)
    assert folder == "s3://raypt-runs/runs/on-s3"
    kept = checkpoint.list_checkpoints(folder)
    assert [c.rsplit("/", 1)[-1] for c in kept] == ["step000003", "step000006"]
    assert checkpoint.read_state(kept[-1])[0].step == 6
    fs, path = storage.resolve(folder)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(path))}
    assert {"metrics.jsonl", "summary.json", "export"} <= names
    with fs.open_input_stream(f"{path}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f.read().decode().splitlines()]
    assert [r for r in records if "resumed_from" in r][0]["resumed_from"] == 3
    text = b"".join(fs.open_input_stream(f"{path}/{n}").read() for n in ("metrics.jsonl", "summary.json"))
    assert b"raypt-test-secret" not in text and b"raypt-test-key" not in text


def test_sweep_on_s3_keeps_its_trials_and_results_there(ray_cluster, s3_endpoint, make_job, monkeypatch, tmp_path):
    import yaml

    from raypt import config
    from raypt.tune.results import trials
    from raypt.tune.run import run_sweep
    from raypt.tune.sweep import load_sweep

    boto3.client("s3").create_bucket(Bucket="raypt-sweeps")
    monkeypatch.chdir(tmp_path)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(make_job("train.steps=4", "train.eval_every=2", "scaling.workers=1",
                                                          "checkpoint.every=2"))))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "on-s3", "base": str(job), "storage": "s3://raypt-sweeps/sweeps",
                                    "search": {"train.lr": {"grid": [3e-3]}}}))
    sweep, base = load_sweep(str(path))
    folder = run_sweep(sweep, base)
    assert folder == "s3://raypt-sweeps/sweeps/on-s3"
    [row] = trials(sweep)
    assert row["status"] == "finished" and row["step"] == 4 and row["final_val_loss"] is not None
    fs, root = storage.resolve(folder)
    names = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root))}
    assert {"sweep.yaml", "results.md", "results.csv", "curves.png", "best.yaml", "trials.json", "tune",
            row["trial"]} <= names
    assert [c.rsplit("/", 1)[-1] for c in checkpoint.list_checkpoints(f"{folder}/{row['trial']}")] == [
        "step000002", "step000004"]
