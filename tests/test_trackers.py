"""The sink and its trackers without Ray: TensorBoard, MLflow (a local file store) and W&B (offline) each hold one
run across a worker-group restart and a driver restart, every step once, the resolved job as config, and nothing
of the environment's credentials in what they write."""
from __future__ import annotations

import glob
import json
import os
import struct
import sys

import pytest
import yaml

from raypt import config
from raypt.config import ConfigError
from raypt.metrics import trackers
from raypt.metrics.sink import Sink, read_metrics

SECRETS = {"WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567",
           "AWS_SECRET_ACCESS_KEY": "raypt-fake-aws-secret-5f1e9d"}
LONG = "x" * 7000  # past MLflow's cap on a param value


def records(steps: range, attempt: int) -> list[dict]:
    """Records as rank 0 sends them; the loss says which attempt wrote it, so a test sees which value a step kept."""
    return [{"step": s, "loss": attempt + 1 / (s + 2), "lr": 0.003, "tokens_seen": 64 * s, "time": 1.7e9 + s,
             "sample_ids": [s], **({"val_loss": 2.0} if s % 4 == 0 else {})} for s in steps]


@pytest.fixture
def env(tmp_path, monkeypatch):
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store in maintenance mode
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # the tests send nothing off this machine
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))  # nothing in the home folder
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    return tmp_path


def wandb_records(path: str) -> list:
    """The protobuf Records of an offline W&B run file: a 7-byte header, then LevelDB-log framing (32 KiB blocks
    of chunks: CRC-32C, length, type) around them. wandb 0.31 reads these files in its Go core only."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    out, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if pos % 32768 + 7 > 32768:  # a block's zero trailer
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def test_trackers_hold_one_run_across_restarts(env):
    from mlflow import MlflowClient

    cfg = config.load(None, ["run.name=tiny", "run.group=sweep", "run.trackers=[tensorboard, mlflow, wandb]"],
                      check_data=False)
    job = {**config.to_dict(cfg), "note": LONG}
    folder = str(env / "runs" / "tiny")
    kwargs = dict(trackers=cfg.run.trackers, run_name=cfg.run.name, group=cfg.run.group, config=job)

    sink = Sink(folder, **kwargs)
    sink.begin(0)
    sink.log(records(range(0, 7), attempt=1))
    sink.poll()
    sink.begin(3)  # the worker group restarts from the checkpoint of step 3
    sink.log(records(range(4, 9), attempt=2))
    sink.close()
    sink = Sink(folder, **kwargs)  # the driver starts again, resuming the checkpoint of step 6
    sink.begin(6)
    sink.log(records(range(7, 11), attempt=3))
    sink.close()

    # metrics.jsonl: every step once, each from the attempt that went on from it
    kept = {r["step"]: int(r["loss"]) for r in read_metrics(folder)}
    assert kept == {**{s: 1 for s in range(0, 4)}, **{s: 2 for s in range(4, 7)}, **{s: 3 for s in range(7, 11)}}

    # MLflow: one run, in the group's experiment; neither service takes points back, so a step keeps its first value
    client = MlflowClient()
    experiment = client.get_experiment_by_name("sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["tiny"] and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.tags["raypt.run"] == "tiny" and run.data.tags["raypt.group"] == "sweep"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(11))
    assert {m.step: int(m.value) for m in history} == {**{s: 1 for s in range(7)}, **{s: 2 for s in (7, 8)},
                                                        9: 3, 10: 3}
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_loss")) == [0, 4, 8]
    assert "sample_ids" not in run.data.metrics and "time" not in run.data.metrics
    params = run.data.params
    assert params["run.name"] == "tiny" and params["train.lr"] == "0.003" and params["model.task"] == "clm"
    assert params["run.trackers"] == '["tensorboard", "mlflow", "wandb"]'
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    stored = client.download_artifacts(run.info.run_id, "config.yaml", str(env / "download"))
    with open(stored) as f:
        assert yaml.safe_load(f) == job

    # W&B (offline): one run id across both driver attempts, its config, each step once
    run_id = json.load(open(os.path.join(folder, "wandb_run.json")))["id"]
    files = sorted(glob.glob(os.path.join(folder, "wandb", "offline-run-*", "run-*.wandb")))
    assert len(files) == 2 and all(f.endswith(f"run-{run_id}.wandb") for f in files)
    read = [r for f in files for r in wandb_records(f)]
    started = [r.run for r in read if r.WhichOneof("record_type") == "run"]
    assert {(r.run_id, r.project, r.run_group, r.display_name) for r in started} == {
        (run_id, "raypt", "sweep", "tiny")}
    settings = {u.key: json.loads(u.value_json) for u in started[0].config.update}
    assert settings["run"]["name"] == "tiny" and settings["train"]["lr"] == 0.003
    steps = {}
    for r in read:
        if r.WhichOneof("record_type") == "history":
            items = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            steps.setdefault(items["_step"], []).append(int(items["loss"]))
    assert steps == {s: [v] for s, v in {m.step: int(m.value) for m in history}.items()}

    # TensorBoard: the purge hides what the first attempt wrote past step 3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(folder, "tensorboard"))
    events.Reload()
    assert {e.step: int(e.value) for e in events.Scalars("loss")} == kept

    # nothing any tracker wrote holds a credential of the environment
    for root, _, names in os.walk(env):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                content = f.read()
            assert not any(secret.encode() in content for secret in SECRETS.values()), os.path.join(root, name)


class Broken(trackers.Tracker):
    def log(self, records):
        raise ConnectionError("https://user:hunter2@tracking.example/api/2.0/mlflow/runs/log-batch refused")


def test_a_failing_tracker_costs_a_line_not_the_run(tmp_path, monkeypatch):
    monkeypatch.setitem(trackers.TRACKERS, "broken", Broken)
    sink = Sink(str(tmp_path), trackers=["broken"])
    sink.begin(0)
    events = []
    for steps in (range(0, 3), range(3, 5)):
        sink.log(records(steps, attempt=1))
        latest, said = sink.poll()
        events += said
    assert [r["step"] for r in read_metrics(str(tmp_path))] == list(range(5)) and latest["step"] == 4
    assert len(events) == 1 and events[0].startswith("tracker broken: could not log steps 0-2 (metrics.jsonl")
    assert "hunter2" not in events[0] and "ConnectionError: https://tracking.example/" in events[0]


def test_default_sink_writes_tensorboard_only(tmp_path):
    sink = Sink(str(tmp_path))
    sink.begin(0)
    sink.log(records(range(0, 2), attempt=1))
    sink.close()
    assert os.listdir(tmp_path / "tensorboard") and not glob.glob(str(tmp_path / "*_run.json"))


@pytest.mark.parametrize("name,hidden,message", [
    ("mlflow", "mlflow", "run.trackers: 'mlflow' needs the mlflow package: pip install 'raypt[mlflow]'"),
    ("wandb", "wandb", "run.trackers: 'wandb' needs the wandb package: pip install 'raypt[wandb]'"),
    ("mlflow", "sqlalchemy", "run.trackers: 'mlflow' needs sqlalchemy: pip install 'raypt[mlflow]'"),
])
def test_a_missing_package_is_a_config_error(name, hidden, message, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # MLflow's default store is a database
    monkeypatch.setitem(sys.modules, hidden, None)  # find_spec then answers: not installed
    with pytest.raises(ConfigError) as err:
        trackers.check(["tensorboard", name])
    assert str(err.value) == message


def test_a_tracking_server_needs_no_database_packages(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    trackers.check(["mlflow", "wandb", "tensorboard"])


def tensorboard_steps(folder: str, tag: str = "loss") -> dict[int, int]:
    """What TensorBoard shows of a run folder: step -> the attempt that wrote it (see records)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(folder, "tensorboard"))
    events.Reload()
    return {e.step: int(e.value) for e in events.Scalars(tag)}


def test_a_remote_run_continues_its_storage_copy_on_another_machine(env, s3_endpoint):
    """Two drivers on two machines (two empty local folders) share one run on S3: the second continues what
    storage held at the last checkpoint, and storage ends with every step once, in the files and in MLflow."""
    import boto3
    from mlflow import MlflowClient

    from raypt import storage

    boto3.client("s3").create_bucket(Bucket="raypt-live")
    remote = "s3://raypt-live/runs/live"
    kwargs = dict(trackers=["tensorboard", "mlflow"], run_name="live", remote=remote)

    first = Sink(str(env / "machine-a" / "live"), **kwargs)
    first.begin(0)
    first.log(records(range(0, 4), attempt=1))
    first.flush()  # the checkpoint of step 3
    fetched = str(env / "look")
    storage.copy_tree(remote, fetched)
    assert [r["step"] for r in read_metrics(fetched)] == [0, 1, 2, 3]
    assert tensorboard_steps(fetched) == {s: 1 for s in range(4)}, "TensorBoard reached storage at the checkpoint"
    first.log(records(range(4, 6), attempt=1))
    first.poll()  # steps 4 and 5 reach machine A's disk, then the machine is lost before the next checkpoint

    second = Sink(str(env / "machine-b" / "live"), **kwargs)
    second.begin(3)
    second.log(records(range(4, 9), attempt=2))
    second.flush()  # the checkpoint of step 8
    second.close()

    final = str(env / "final")
    storage.copy_tree(remote, final)
    expected = {**{s: 1 for s in range(4)}, **{s: 2 for s in range(4, 9)}}
    assert [(r["step"], int(r["loss"])) for r in read_metrics(final)] == sorted(expected.items())
    assert tensorboard_steps(final) == expected
    # MLflow: machine B found the run id in storage and continued the same run. Steps 4 and 5 come twice: machine
    # A sent them after the last checkpoint, and a service cannot take points back.
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("live").experiment_id])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8]
