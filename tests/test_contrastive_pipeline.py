"""The contrastive pipeline, short, on the shared Ray cluster: AMCL on the labelled digits with two workers,
killed and resumed (and one of its read tasks killed mid-task), against the uninterrupted run; then the reproduction's sweep file (jobs/papers/amcl) through
`raypt tune`, one AMCL and one SimCLR trial of a tiny budget, each reporting its probe and k-NN accuracy."""
from __future__ import annotations

import os

import pytest

from raypt import config
from raypt.metrics.sink import read_metrics

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")
SMALL = ("model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.proj_dim=16",
         "model.phi_hidden=16", "data.image.size=16", "train.global_batch=32", "train.micro_batch=16",
         "train.steps=6", "train.eval_every=3", "train.eval_batches=1", "checkpoint.every=2")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    from raypt.data.prepare import prepare

    path = str(tmp_path_factory.mktemp("data") / "digits")
    cfg = config.load(os.path.join(JOBS, "contrastive.yaml"), [f"data.path={path}", "data.prepare.image_max_side=16"],
                      check_data=False)
    prepare(cfg.data.path, cfg.data.prepare)
    return path


def job(digits: str, storage, *overrides: str) -> config.JobConfig:
    return config.load(os.path.join(JOBS, "contrastive.yaml"),
                       [f"data.path={digits}", f"run.storage={storage}", *SMALL, *overrides])


def test_sigkilled_amcl_run_resumes_exactly_and_reports_its_probes(ray_cluster, digits, tmp_path):
    from transformers import AutoModel

    from raypt.driver import train
    from raypt.hooks.faults import fired

    whole = read_metrics(train(job(digits, tmp_path, "run.name=amcl-whole", "run.log_sample_ids=true")))
    # Also a read task SIGKILLed mid-run: without read-ahead, rank 1's window of steps 3-4 is decoded after step 2.
    folder = train(job(digits, tmp_path, "run.name=amcl-kill", "faults.kill_at_step=5", "faults.kill_rank=1",
                       "failure.max_failures=1", "faults.kill_reader_at_step=3", "data.prefetch_batches=0",
                       "run.log_sample_ids=true"))
    assert fired(folder, "kill")["step"] == 5 and fired(folder, "kill_reader")["batch"] == 2
    got = read_metrics(folder)
    assert [r["resumed_from"] for r in got if "resumed_from" in r] in ([2], [4])  # the reader's death cost nothing
    losses = {r["step"]: r["loss"] for r in got if "loss" in r}
    want = {r["step"]: r["loss"] for r in whole if "loss" in r}
    assert sorted(losses) == list(range(1, 7)) and all(abs(losses[s] - want[s]) <= 1e-5 for s in want)
    ids = {r["step"]: r["sample_ids"] for r in got if "sample_ids" in r}
    assert ids == {r["step"]: r["sample_ids"] for r in whole if "sample_ids" in r}  # none lost, none repeated
    evaluations = [r for r in whole if "val_loss" in r]
    assert [r["step"] for r in evaluations] == [0, 3, 6]
    for r in evaluations:  # the probes score every evaluation, on all 324 held-out digits
        assert 0.1 < r["probe_acc"] <= 1 and 0.1 < r["knn_acc"] <= 1
    trained = [r for r in whole if "loss" in r]
    assert all(0.05 <= r["tau_pos_mean"] <= 2 and 0.05 <= r["tau_neg_mean"] <= 2 for r in trained)
    assert all({"loss_head0", "loss_head1", "loss_head2", "omega", "tau_neg_std"} <= set(r) for r in trained)
    encoder = AutoModel.from_pretrained(os.path.join(folder, "export"))  # the encoder alone
    assert type(encoder).__name__ == "ViTModel" and encoder.config.image_size == 16


def test_the_reproduction_sweep_compares_amcl_and_simclr_through_tune(ray_cluster, digits, tmp_path):
    from raypt.tune.results import trials
    from raypt.tune.run import run_sweep
    from raypt.tune.sweep import load_sweep

    sweep, base = load_sweep(os.path.join(JOBS, "papers", "amcl", "sweep.yaml"), [
        f"data.path={digits}", *SMALL, "train.steps=4", "train.eval_every=4", "scaling.workers=1", "train.micro_batch=32",
        "sweep.search={}", f"sweep.storage={tmp_path}",
        "sweep.variants={amcl-3aug: ['data.image.augment=[crop, jitter, blur]'], "
        "simclr-3aug: [model.heads=1, model.temperature=fixed, 'data.image.augment=[crop, jitter, blur]']}"])
    folder = run_sweep(sweep, base)
    rows = {r["variant"]: r for r in trials(sweep)}
    assert set(rows) == {"amcl-3aug", "simclr-3aug"}
    for variant, row in rows.items():
        assert row["status"] == "finished" and row["step"] == 4 and 0.1 < row["final_probe_acc"] <= 1
        last = [r for r in read_metrics(os.path.join(folder, row["trial"])) if "knn_acc" in r][-1]
        assert last["step"] == 4 and 0.1 < last["knn_acc"] <= 1
        model = row["job"]["model"]  # the trial's own resolved job
        want = (3, "adaptive") if variant.startswith("amcl") else (1, "fixed")
        assert (model["heads"], model["temperature"]) == want
