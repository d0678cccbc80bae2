"""`ray job submit` against a real head node (`ray start --head` on 127.0.0.1) plus a second node process."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from raypt import config
from raypt.driver import run_dir
from raypt.metrics.sink import read_metrics

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node and a worker node, each a blocking `ray start` in its own process group, stopped at the end."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's unix socket paths must fit 107 bytes
    def common() -> list[str]:  # per node: the default agent port is taken by the suite's own cluster
        return ["--block", "--disable-usage-stats", f"--dashboard-agent-listen-port={free_port()}"]

    nodes = [subprocess.Popen([f"{BIN}/ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                               f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--num-cpus=3",
                               f"--temp-dir={temp}", *common()], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    from ray.job_submission import JobStatus

    ready = None
    for _ in range(600):  # bounded: the Job API and its agent take a few seconds to come up
        try:
            ready = JobSubmissionClient(address).submit_job(entrypoint="echo ready")
            break
        except Exception:
            time.sleep(0.2)
    assert ready is not None, "the head node's Job API never accepted a job"
    client = JobSubmissionClient(address)
    for _ in range(600):
        if client.get_job_status(ready) == JobStatus.SUCCEEDED:
            break
        time.sleep(0.2)
    # Its own temp dir, as a second machine would have: nodes sharing one would unpack the job's working_dir
    # over each other, pulling the running driver's cwd from under it.
    second = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    nodes.append(subprocess.Popen([f"{BIN}/ray", "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                   f"--temp-dir={second}", *common()],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL))
    yield address, env
    for node in reversed(nodes):
        os.killpg(node.pid, signal.SIGTERM)
        node.wait(timeout=60)
    marker = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if os.path.exists(marker) and open(marker).read().strip().endswith(f":{gcs}"):
        os.remove(marker)


def job_file(cfg: config.JobConfig, path) -> str:
    path.write_text(yaml.safe_dump(config.to_dict(cfg)))
    return str(path)


def submit(address: str, env: dict, *args: str, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [f"{BIN}/raypt", "submit", *args, "--address", address]
    if wait:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_config_mistake_fails_fast_with_the_clear_error(head, make_job, tmp_path):
    address, env = head
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = make_job("run.name=broken")
    job = job_file(cfg, tmp_path / "job.yaml")
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=f"raypt train {job} deepspeed.zero_stage=7")
    for _ in range(1200):
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(0.1)
    assert status == JobStatus.FAILED
    logs = client.get_job_logs(job_id)
    assert "deepspeed.zero_stage: got 7" in logs and "Traceback" not in logs


def test_stopped_job_resubmitted_resumes_and_succeeds_with_checkpoint_and_export(head, make_job, tmp_path):
    address, env = head
    from ray.job_submission import JobStatus, JobSubmissionClient

    cfg = make_job("run.name=stop-resume", "train.steps=120", "checkpoint.every=5")
    job = job_file(cfg, tmp_path / "job.yaml")
    client = JobSubmissionClient(address)
    first = client.submit_job(entrypoint=f"raypt train {job}")
    folder = run_dir(cfg)
    from raypt.checkpoint import latest_good

    for _ in range(3000):
        if os.path.isdir(folder) and latest_good(folder, log=lambda m: None):
            break
        assert client.get_job_status(first) in (JobStatus.PENDING, JobStatus.RUNNING)
        time.sleep(0.1)
    client.stop_job(first)
    for _ in range(600):
        if client.get_job_status(first) == JobStatus.STOPPED:
            break
        time.sleep(0.1)
    assert client.get_job_status(first) == JobStatus.STOPPED
    stopped_at = max(r["step"] for r in read_metrics(folder))
    assert stopped_at < 120
    proc = submit(address, env, job)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "SUCCEEDED" in proc.stdout
    assert os.path.isfile(os.path.join(folder, "export", "model.safetensors"))
    records = read_metrics(folder)
    assert [r["step"] for r in records] == list(range(121))
    resumed = [r for r in records if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] > 0
    assert json.load(open(os.path.join(folder, "step000120", "raypt_state.json")))["step"] == 120


def test_sweep_submitted_with_ray_job_submit_succeeds(head, make_job, tmp_path):
    address, env = head
    job = job_file(make_job("train.steps=4", "train.eval_every=2", "checkpoint.every=2", "scaling.workers=1"),
                   tmp_path / "job.yaml")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "submitted", "base": job, "storage": str(tmp_path / "sweeps"),
                                     "search": {"train.lr": {"grid": [1e-3, 3e-3]}}}))
    proc = subprocess.run([f"{BIN}/ray", "job", "submit", "--address", address, "--", "raypt", "tune", str(sweep)],
                          env=env, capture_output=True, text=True, timeout=600)
    shown = proc.stdout + proc.stderr  # `ray job submit` exits 1 when the job fails
    assert proc.returncode == 0 and "' succeeded" in shown, shown[-3000:]
    status = json.load(open(tmp_path / "sweeps" / "submitted" / "trials.json"))
    assert sorted(status.values()) == ["finished", "finished"]


def test_data_prepare_submitted_to_the_cluster_writes_what_one_process_writes(head, make_job, tmp_path):
    """`ray job submit -- raypt data prepare JOB` with 4 Ray tasks on the two-node cluster: the same files as a
    preparation in this process alone."""
    from raypt.data.prepare import prepare

    address, env = head
    (tmp_path / "in").mkdir()
    for i in range(6):
        lines = [json.dumps({"text": f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" * (1 + j % 5)}) for j in range(400)]
        (tmp_path / "in" / f"part{i}.jsonl").write_text("\n".join(lines) + "\n")
    body = config.to_dict(make_job())
    body["data"]["path"] = str(tmp_path / "submitted")
    body["data"]["prepare"].update(source="text", inputs=[str(tmp_path / "in")], seq_len=32, vocab_size=300,
                                   max_memory_mb=16, parallel=4)
    job = tmp_path / "prepare.yaml"
    job.write_text(yaml.safe_dump(body))
    proc = subprocess.run([f"{BIN}/ray", "job", "submit", "--address", address, "--", "raypt", "data", "prepare",
                           str(job)], env=env, capture_output=True, text=True, timeout=600)
    shown = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in shown, shown[-3000:]
    cfg = config.load(str(job), ["data.prepare.parallel=1", f"data.path={tmp_path / 'here'}"], check_data=False)
    prepare(cfg.data.path, cfg.data.prepare)

    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    submitted = files(tmp_path / "submitted")
    assert len([p for p in submitted if str(p).endswith(".parquet")]) >= 2 and submitted == files(tmp_path / "here")
