"""Runs whose storage is S3 (moto's server on 127.0.0.1): checkpoints, restore after a failure, run files."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
import threading

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import yaml

from raypt import checkpoint, config, storage
from raypt.driver import TrainingFailed, train
from raypt.metrics.sink import read_metrics


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


def test_folder_copies_to_and_from_s3_with_more_files_than_io_threads(s3_endpoint, tmp_path):
    """The copy pyarrow deadlocked on before apache/arrow#44897: more files than I/O threads, written to S3."""
    boto3.client("s3").create_bucket(Bucket="raypt-copies")
    src = tmp_path / "src"
    for i in range(12):
        (src / f"part{i % 3}").mkdir(parents=True, exist_ok=True)
        (src / f"part{i % 3}" / f"shard{i:02d}.bin").write_bytes(os.urandom(1000 + i))
    back, threads = tmp_path / "back", pa.io_thread_count()
    pa.set_io_thread_count(2)
    try:
        done = threading.Thread(target=lambda: (storage.copy_tree(str(src), "s3://raypt-copies/ckpt"),
                                                storage.copy_tree("s3://raypt-copies/ckpt", str(back))), daemon=True)
        done.start()
        done.join(timeout=120)  # a deadlock never returns: fail instead of hanging the suite
        assert not done.is_alive(), "folder copy through S3 hung"
    finally:
        pa.set_io_thread_count(threads)
    files = sorted(p.relative_to(src) for p in src.rglob("*.bin"))
    assert len(files) == 12 and sorted(p.relative_to(back) for p in back.rglob("*.bin")) == files
    assert all((src / f).read_bytes() == (back / f).read_bytes() for f in files)


class DroppingEndpoint:
    """An S3 endpoint that accepts each connection and drops it at once (a failing proxy), counting them."""

    def __enter__(self) -> "DroppingEndpoint":
        self.server, self.count = socket.create_server(("127.0.0.1", 0)), 0
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self.serve, daemon=True).start()
        return self

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:  # closed by __exit__
                return
            self.count += 1  # before the close the client sees as a failed attempt
            conn.close()

    def __exit__(self, *exc) -> None:
        self.server.close()


def test_the_filesystem_handed_to_ray_keeps_its_retry_strategy_when_pickled(s3_endpoint):
    # driver.build hands Ray Train what storage.resolve gives for the run's storage
    assert isinstance(storage.resolve("s3://raypt-runs/runs")[0], storage.S3)
    with DroppingEndpoint() as endpoint:
        fs = storage.S3(endpoint_override=endpoint.address, scheme="http", region="us-east-1",
                        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=2))
        copy = pickle.loads(pickle.dumps(fs))  # pyarrow's own pickling falls back to its default of 3 attempts
        with pytest.raises(OSError):
            copy.get_file_info("raypt-runs/runs/config.yaml")
        assert endpoint.count == 2


def loss_steps(folder: str) -> list[int]:
    """The steps TensorBoard shows a loss for, in a downloaded copy of a run's tensorboard/ folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(folder)
    events.Reload()
    return [e.step for e in events.Scalars("loss")]


def test_a_run_on_s3_resumed_by_a_fresh_driver_elsewhere_keeps_every_record_once(ray_cluster, s3_endpoint, make_job,
                                                                                  monkeypatch, tmp_path):
    import ray

    boto3.client("s3").create_bucket(Bucket="raypt-live")
    cfg = make_job("run.storage=s3://raypt-live/runs", "run.name=live", "train.steps=6", "checkpoint.every=3",
                   "scaling.workers=1", "run.log_every=1", "faults.raise_at_step=5", "failure.max_failures=0")
    folder = "s3://raypt-live/runs/live"
    for machine in ("a", "b"):
        (tmp_path / machine).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(TrainingFailed):  # stopped before step 5, after the checkpoint of step 3
        train(cfg)
    storage.copy_tree(f"{folder}/tensorboard", str(tmp_path / "at-step-3"))
    assert loss_steps(str(tmp_path / "at-step-3")) == [1, 2, 3], "TensorBoard did not reach storage at step 3"

    # Another driver process, in a folder with no runs/, resumes the same job from storage.
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(cfg)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run([sys.executable, "-m", "raypt", "train", str(job)], cwd=tmp_path / "b", env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    final = tmp_path / "final"
    for name in ("metrics.jsonl", "tensorboard"):
        storage.copy_tree(f"{folder}/{name}", str(final / name))
    records = read_metrics(str(final))
    assert [r["step"] for r in records] == list(range(7))
    assert [(r["step"], r["resumed_from"]) for r in records if "resumed_from" in r] == [(4, 3)]
    assert loss_steps(str(final / "tensorboard")) == list(range(1, 7))
