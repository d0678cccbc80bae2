"""End-to-end runs on the shared local Ray cluster: real DeepSpeed engines on two workers, real exports."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import yaml

from raypt import config
from raypt.driver import run_dir, train
from raypt.metrics.sink import read_metrics

STEPS = 4


@pytest.fixture(scope="module")
def zero_runs(ray_cluster, make_job):
    """The same 2-worker job under ZeRO 0 and 3 from one seed: the extremes on the real stack (the gloo tier
    compares all four stages, and CPU offload, at 1 to 4 ranks)."""
    runs = {}
    for stage in (0, 3):
        cfg = make_job(f"run.name=zero{stage}", f"deepspeed.zero_stage={stage}", f"train.steps={STEPS}")
        runs[stage] = (cfg, train(cfg))
    return runs


def losses(folder: str) -> list[float]:
    return [r["loss"] for r in read_metrics(folder) if r.get("loss") is not None]


def test_zero_stages_give_the_same_losses(zero_runs):
    reference = losses(zero_runs[0][1])
    assert len(reference) == STEPS
    assert reference[-1] < reference[0]
    other = losses(zero_runs[3][1])
    assert max(abs(a - b) for a, b in zip(reference, other)) <= 1e-4, (reference, other)


def test_run_folder_holds_metrics_summary_tensorboard_checkpoints(zero_runs):
    cfg, folder = zero_runs[3]
    records = read_metrics(folder)
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    for key in ("loss", "lr", "tokens_seen", "tokens_per_s", "mfu", "hfu", "step_time_s", "data_wait_s"):
        assert all(r[key] is not None for r in records[1:]), key
    assert records[0]["val_loss"] and records[-1]["val_loss"]
    summary = json.load(open(os.path.join(folder, "summary.json")))
    assert summary["steps"] == STEPS and 0 < summary["mfu"] < 1
    assert summary["hfu"] == summary["mfu"]  # nothing recomputed without activation checkpointing
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(folder, "tensorboard")))
    assert sorted(d for d in os.listdir(folder) if d.startswith("step")) == ["step000003", "step000004"]


LOGITS_SCRIPT = """
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("def main(argv):\\n    return 0\\n", return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
assert "raypt" not in sys.modules
torch.save({"ids": ids, "logits": logits}, sys.argv[2])
"""


def test_export_loads_in_transformers_alone_with_equal_logits(zero_runs, tmp_path):
    from raypt import checkpoint
    from raypt.data.manifest import read_manifest
    from raypt.tasks import clm

    cfg, folder = zero_runs[3]
    out = tmp_path / "logits.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run([sys.executable, "-c", LOGITS_SCRIPT, os.path.join(folder, "export"), str(out)], check=True,
                   env=env, cwd=tmp_path)
    exported = torch.load(out, weights_only=True)
    model = clm.ClmTask(cfg, {"text": read_manifest(cfg.data.path)}).build_model(seed=123)
    checkpoint.load_weights(model, os.path.join(folder, f"step{STEPS:06d}"))
    with torch.no_grad():
        ours = model.eval()(exported["ids"]).logits
    assert (ours - exported["logits"]).abs().max().item() <= 1e-4


def test_generate_prints_a_continuation(zero_runs):
    folder = zero_runs[3][1]
    proc = subprocess.run([sys.executable, "-m", "raypt", "generate", folder, "import os", "--max-new-tokens", "12"],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("import os") and len(proc.stdout.strip()) > len("import os")


def _has_checkpoint(folder: str) -> bool:
    from raypt.checkpoint import latest_good

    return os.path.isdir(folder) and latest_good(folder, log=lambda m: None) is not None


def test_stopped_run_resumes_from_its_checkpoint(ray_cluster, make_job, tmp_path):
    import ray

    cfg = make_job("run.name=stopped", "train.steps=100", "checkpoint.every=5")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(config.to_dict(cfg)))
    folder = run_dir(cfg)
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "raypt", "train", str(job)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not _has_checkpoint(folder):
            with pytest.raises(subprocess.TimeoutExpired, match="timed out"):
                proc.wait(timeout=0.2)  # the run must still be going while we wait for its first checkpoint
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    before = read_metrics(folder)
    stopped_at = max(r["step"] for r in before)
    assert stopped_at < 100, "the run finished before it was stopped"

    train(cfg)
    records = read_metrics(folder)
    steps = [r["step"] for r in records]
    assert steps == list(range(101)), "each step is recorded exactly once"
    state = json.load(open(os.path.join(folder, "step000100", "raypt_state.json")))
    assert state["step"] == 100 and state["samples_seen"] == 100 * cfg.train.global_batch
    resumed = [r for r in records if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0]["resumed_from"] > 0, "the second attempt did not start from zero"
    assert resumed[0]["step"] == resumed[0]["resumed_from"] + 1
    assert os.path.isdir(os.path.join(folder, f"step{resumed[0]['resumed_from']:06d}")) or \
        resumed[0]["resumed_from"] % cfg.checkpoint.every == 0
    assert records[-1]["val_loss"] < records[0]["val_loss"]
