"""Every command refuses bad input as a user meets it: `raypt ...` in a subprocess exits 2 for a mistake (1 for a
service that does not answer) with exactly one error line naming what is wrong, no traceback, and in seconds."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest
import yaml

from raypt import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "jobs", "quickstart.yaml")
MULTIMODAL = os.path.join(ROOT, "jobs", "multimodal.yaml")
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "checkpoint_v1")
DEAD = "127.0.0.1:1"  # nothing listens on port 1: connections are refused at once


def raypt(*args: str, cwd: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with no Ray cluster to attach to unless `env` names one (None drops a variable)."""
    full = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full.update(env or {})
    full = {k: v for k, v in full.items() if v is not None}
    return subprocess.run([sys.executable, "-m", "raypt", *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def fake_data(tmp_path) -> str:
    """A prepared text dataset as far as the checks before cluster work read one (its manifest)."""
    (tmp_path / "prepared").mkdir()
    (tmp_path / "prepared" / "manifest.json").write_text(json.dumps({"modality": "text", "seq_len": 32}))
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "mae-export").mkdir()
    (tmp_path / "mae-export" / "config.json").write_text(json.dumps({"architectures": ["ViTMAEForPreTraining"]}))
    (tmp_path / "sweeps" / "empty").mkdir(parents=True)
    return str(tmp_path / "prepared")


# (arguments, extra environment, exit status, fragments of the one error line); {tmp} is the test's folder,
# {data} a prepared dataset there.
CASES = [
    ([], {}, 2, ["the following arguments are required: command"]),
    (["fly"], {}, 2, ["invalid choice: 'fly'"]),
    (["config", "show", "jobs/missing.yaml"], {}, 2, ["job file", "'jobs/missing.yaml' does not exist"]),
    (["config", "show", QUICKSTART, "scaling.workers=0"], {}, 2,
     ["scaling.workers: got 0", "greater than or equal to 1"]),
    (["config", "show", MULTIMODAL, "data.sources.3.path=x"], {}, 2, ["data.sources.3.path", "'3' is not an index",
                                                                     "3 items"]),
    (["config", "explain", "nosuch"], {}, 2, ["no section 'nosuch'", "sections: run, run.init_from, model"]),
    (["anneal", "{tmp}/nope", "--tokens", "100"], {}, 2, ["RUN: '{tmp}/nope' holds no config.yaml"]),
    (["anneal", "{tmp}/nope"], {}, 2, ["arguments are required: --tokens"]),
    (["train", QUICKSTART], {}, 2, ["data.path", "{tmp}/data/stdlib", "holds no prepared dataset"]),
    (["train", QUICKSTART, "data.path={data}", "run.storage={tmp}/a-file"], {}, 2,
     ["run.storage", "a-file' is a file; expected a folder"]),
    (["train", QUICKSTART, "data.path={data}", "run.resume_from={tmp}/old/step000004"], {}, 2,
     ["run.resume_from", "old/step000004' does not exist", "checkpoint folder"]),
    (["train", QUICKSTART, "data.path={data}", "run.resume_from={tmp}/sweeps"], {}, 2,
     ["run.resume_from", "no readable raypt_state.json"]),
    (["train", QUICKSTART, "data.path={data}"], {"RAY_ADDRESS": DEAD}, 1,
     ["RAY_ADDRESS", "cannot reach the Ray cluster at 127.0.0.1:1"]),
    (["train", QUICKSTART, "data.path={data}"], {"RAY_ADDRESS": "127.0.0.1:port"}, 2,
     ["RAY_ADDRESS", "'127.0.0.1:port'", "host:port"]),
    (["train", QUICKSTART, "data.path=s3://bucket/data", f"s3.endpoint=http://{DEAD}"], {}, 1,
     ["data.path", f"'s3://bucket/data': cannot reach the S3 endpoint at http://{DEAD}"]),
    (["train", QUICKSTART, "data.path={data}", "run.storage=s3://bucket/runs", "s3.endpoint=http://s3.raypt.invalid"],
     {}, 1, ["run.storage", "cannot reach the S3 endpoint at http://s3.raypt.invalid"]),
    # AWS's own endpoint, through the AWS environment alone: no network and no such region fail the same way
    (["train", QUICKSTART, "data.path=s3://bucket/data", "s3.region=nowhere-9"],
     {"AWS_ENDPOINT_URL": None, "AWS_ENDPOINT_URL_S3": None}, 1,
     ["data.path", "cannot reach the S3 endpoint at https://s3.nowhere-9.amazonaws.com"]),
    (["train", QUICKSTART, "data.path=hdfs://host/data"], {}, 2, ["data.path", "expected a local path or an s3://"]),
    (["data", "prepare", QUICKSTART, "data.path={tmp}/a-file"], {}, 2, ["data.path", "is a file"]),
    (["data", "prepare", QUICKSTART, "data.path={tmp}/new", "data.prepare.tokenizer={tmp}/sweeps"], {}, 2,
     ["data.prepare.tokenizer", "holds neither a prepared text dataset"]),
    (["data", "prepare", QUICKSTART, "data.path={tmp}/new", "data.prepare.source=text",
      "data.prepare.inputs=[s3://bucket/raw]", f"s3.endpoint=http://{DEAD}"], {}, 1,
     ["data.prepare.inputs.0", "cannot reach the S3 endpoint"]),
    (["submit", QUICKSTART, "data.path={data}", "--address", f"http://{DEAD}"], {}, 1,
     ["--address", f"cannot reach the Ray cluster at http://{DEAD}"]),
    (["submit"], {}, 2, ["the following arguments are required: job"]),
    (["export", QUICKSTART, "data.path={data}", "run.storage={tmp}", "run.name=none"], {}, 2,
     ["run.name", "run 'none' has no committed checkpoint under {tmp}/none"]),
    (["export", QUICKSTART, "data.path={data}", "--out", "{tmp}/a-file"], {}, 2, ["--out", "is a file"]),
    (["export", QUICKSTART, "data.path={data}", "--out", "s3://bucket/x"], {"AWS_ENDPOINT_URL": f"http://{DEAD}"}, 1,
     ["--out", "cannot reach the S3 endpoint"]),
    (["generate", "{tmp}/runs/none", "hello"], {}, 2, ["path", "runs/none' is neither a run folder", "raypt export"]),
    (["generate", "{tmp}/mae-export", "hello"], {}, 2, ["ViTMAEForPreTraining export", "'clm' exports only"]),
    (["generate", "{tmp}", "hello", "--max-new-tokens", "0"], {}, 2, ["--max-new-tokens", "got '0'", "int >= 1"]),
    (["generate", "{tmp}", "hello", "--temperature", "hot"], {}, 2, ["--temperature", "got 'hot'", "float >= 0"]),
    (["generate", "s3://bucket/runs/r", "hello"], {"AWS_ENDPOINT_URL": f"http://{DEAD}"}, 1,
     ["path: 's3://bucket/runs/r': cannot reach the S3 endpoint"]),
    (["tune", "sweeps/missing.yaml"], {}, 2, ["sweep file", "'sweeps/missing.yaml' does not exist"]),
    (["tune", "sweeps/missing.yaml"], {"RAY_ADDRESS": DEAD}, 1, ["RAY_ADDRESS", "cannot reach the Ray cluster"]),
    (["tune", "show", "{tmp}/sweeps/empty"], {}, 2, ["tune show", "holds no sweep (sweep.yaml missing)"]),
    (["tune", "show", "s3://bucket/sweeps/lr"], {"AWS_ENDPOINT_URL": f"http://{DEAD}"}, 1,
     ["tune show", "cannot reach the S3 endpoint"]),
]


@pytest.mark.parametrize("args,env,status,expected", CASES, ids=[" ".join(a[:3]) + f" {e}" for a, e, _, _ in CASES])
def test_bad_input_gets_one_message_and_no_traceback(args, env, status, expected, fake_data, tmp_path):
    fill = {"{tmp}": str(tmp_path), "{data}": fake_data}
    for k, v in fill.items():
        args = [a.replace(k, v) for a in args]
        expected = [e.replace(k, v) for e in expected]
    began = time.time()
    proc = raypt(*args, cwd=str(tmp_path), env=env)
    took = time.time() - began
    assert proc.returncode == status, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    message = proc.stderr[proc.stderr.index("error:"):]  # an invalid config lists its fields on lines below
    for fragment in expected:
        assert fragment in message, (fragment, message)
    assert took < 20, f"took {took:.1f} s"  # seconds, not a minute of retries (generous: a loaded 2-core machine)
    assert not os.path.exists(tmp_path / "runs"), "a refused command must not create its run folder"


def test_moto_bucket_that_does_not_exist_is_named(s3_endpoint, fake_data, tmp_path):
    proc = raypt("train", QUICKSTART, f"data.path={fake_data}", "run.storage=s3://no-such-bucket/runs",
                 cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert "run.storage" in proc.stderr and "the bucket 'no-such-bucket' does not exist" in proc.stderr


def test_submit_pins_every_source_path(tmp_path, monkeypatch):
    """jobs/multimodal.yaml's sources are relative; the cluster runs the job in another folder."""
    from raypt.submit import entrypoint

    monkeypatch.chdir(ROOT)
    cfg = config.load("jobs/multimodal.yaml", check_data=False)
    command = entrypoint("jobs/multimodal.yaml", [], cfg)
    _, _, job, *overrides = shlex.split(command)
    shutil.copytree(os.path.join(ROOT, "jobs"), tmp_path / "jobs")
    monkeypatch.chdir(tmp_path)  # the cluster's working directory
    there = config.load(job, overrides, check_data=False)
    assert [s.path for s in there.data.sources] == [s.path for s in cfg.data.sources]
    assert all(s.path.startswith(ROOT) for s in there.data.sources) and there.run.storage == cfg.run.storage


def test_resume_from_is_named_when_the_run_has_its_own_checkpoints(fake_data, tmp_path):
    """The run's own checkpoints win over run.resume_from; a bad resume_from is then not an error, and the
    note names both."""
    from raypt.preflight import check_run, resume_note

    (tmp_path / "runs" / "r" / "step000004").mkdir(parents=True)
    cfg = config.load(None, [f"data.path={fake_data}", f"run.storage={tmp_path}/runs", "run.name=r",
                             f"run.resume_from={tmp_path}/gone/step000002"], check_data=False)
    check_run(cfg)
    note = resume_note(cfg)
    assert f"run.resume_from={tmp_path}/gone/step000002 is not used" in note
    assert f"{tmp_path}/runs/r already holds checkpoints" in note and "step000004" in note
    fresh = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "fresh"})})
    assert resume_note(fresh) is None
    with pytest.raises(config.ConfigError, match="run.resume_from: .*does not exist"):
        check_run(fresh)


@pytest.mark.slow  # a real export and model load, through S3: with the Ray tier, so the fast tier stays quick
def test_export_reads_a_run_on_s3_and_writes_local_and_s3(s3_endpoint, make_job, tmp_path):
    """`raypt export` of an s3:// run folder (the format-1 fixture checkpoint of the suite's tiny job) to both
    kinds of destination; `raypt generate` then reads the S3 export."""
    import boto3
    import pyarrow.fs as pafs

    from raypt import storage

    boto3.client("s3").create_bucket(Bucket="exports")
    fs, _ = storage.resolve("s3://exports/runs")
    storage.copy_tree(FIXTURE, "s3://exports/runs/r/step000003")
    cfg = make_job("run.storage=s3://exports/runs", "run.name=r")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(cfg)))
    local = raypt("export", str(job), "--out", str(tmp_path / "out"), cwd=str(tmp_path))
    assert local.returncode == 0, local.stderr
    assert f"exported step000003 to {tmp_path / 'out'}" in local.stdout
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()
    remote = raypt("export", str(job), cwd=str(tmp_path))  # default: the run folder's export/
    assert remote.returncode == 0, remote.stderr
    assert fs.get_file_info("exports/runs/r/export/config.json").type == pafs.FileType.File
    sampled = raypt("generate", "s3://exports/runs/r", "def ", "--max-new-tokens", "4", cwd=str(tmp_path))
    assert sampled.returncode == 0 and sampled.stdout.startswith("def"), sampled.stderr
