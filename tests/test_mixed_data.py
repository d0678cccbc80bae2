"""Mixed sources on the shared local Ray cluster: exact counts per global batch, staged weights, per-source
validation losses (and an evaluation-only dataset), and a resume at the same or another world size that sees
exactly the samples of the uninterrupted order."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raypt import config
from raypt.data.mix import MixPlan
from raypt.data.prepare import prepare
from raypt.data.stream import SOURCE_BITS
from raypt.driver import run_dir, train
from raypt.metrics.sink import read_metrics

STEPS = 8


@pytest.fixture(scope="module")
def replay_data(tiny_data, tmp_path_factory) -> str:
    """Earlier data to replay: another slice of the corpus, tokenized with the main source's tokenizer."""
    path = str(tmp_path_factory.mktemp("replay") / "stdlib")
    cfg = config.load(None, ["data.prepare.max_bytes=150000", "data.prepare.seq_len=32",
                             "data.prepare.rows_per_group=64", f"data.prepare.tokenizer={tiny_data}"],
                      check_data=False)
    prepare(path, cfg.data.prepare)
    return path


def mixed(make_job, tiny_data, replay_data, *overrides: str):
    """code 6 : replay 2 per global batch of 8, then 4 : 4 once 768 tokens are seen (from step 4)."""
    sources = (f"data.sources=[{{name: code, path: {tiny_data}, weight: 3}}, "
               f"{{name: replay, path: {replay_data}, weight: 1}}]")
    return make_job(sources, "data.stages=[{at_tokens: 768, weights: {code: 1, replay: 1}}]",
                    f"train.steps={STEPS}", "checkpoint.every=2", "run.log_sample_ids=true", *overrides)


def ids_by_step(folder: str) -> dict[int, list[int]]:
    return {r["step"]: r["sample_ids"] for r in read_metrics(folder) if "sample_ids" in r}


@pytest.fixture(scope="module")
def reference(ray_cluster, make_job, tiny_data, replay_data):
    # the replay data again, evaluated only: what a run measures forgetting on
    cfg = mixed(make_job, tiny_data, replay_data, "run.name=mix-reference",
                f"data.eval_sources=[{{name: old, path: {replay_data}}}]")
    return cfg, ids_by_step(train(cfg))


def test_each_global_batch_holds_the_exact_counts_of_its_stage(reference):
    cfg, ids = reference
    assert sorted(ids) == list(range(1, STEPS + 1))
    plan = MixPlan([(at, np.array(w)) for at, w in cfg.data.stage_weights()], 8, np.array([32, 32]))
    for step, got in ids.items():
        sources = np.array(got) >> SOURCE_BITS
        assert np.bincount(sources, minlength=2).tolist() == plan.counts[plan.stage(step - 1)].tolist(), step
    # 256 tokens per batch: steps 1-3 come before 768 tokens, step 4 on after
    assert [np.bincount(np.array(ids[s]) >> SOURCE_BITS).tolist() for s in (1, 3, 4, 8)] == [[6, 2]] * 2 + [[4, 4]] * 2
    for source in (0, 1):
        seen = [i for s in sorted(ids) for i in ids[s] if i >> SOURCE_BITS == source]
        assert len(seen) == len(set(seen)), "a sample of one source was repeated"


def test_every_evaluation_reports_each_source_and_the_mix_at_the_weights_in_force(reference):
    cfg, _ = reference
    evaluations = {r["step"]: r for r in read_metrics(run_dir(cfg)) if "val_loss" in r}
    assert sorted(evaluations) == [0, 4, 8]
    weights = {0: (3, 1), 4: (1, 1), 8: (1, 1)}  # 768 tokens are seen from step 3 on
    for step, r in evaluations.items():
        (w_code, w_replay), losses = weights[step], (r["val_loss/code"], r["val_loss/replay"])
        assert abs(r["val_loss"] - (w_code * losses[0] + w_replay * losses[1]) / (w_code + w_replay)) < 1e-6
        assert abs(r["val_loss/old"] - r["val_loss/replay"]) < 1e-6  # the same held-out samples, never trained on
    with open(os.path.join(run_dir(cfg), "summary.json")) as f:
        summary = json.load(f)
    assert all(summary[f"final_val_loss/{n}"] == evaluations[8][f"val_loss/{n}"] for n in ("code", "replay", "old"))


def test_restart_on_two_workers_sees_the_uninterrupted_samples(reference, make_job, tiny_data, replay_data):
    cfg = mixed(make_job, tiny_data, replay_data, "run.name=mix-restart", "faults.raise_at_step=5",
                "failure.max_failures=1")
    assert ids_by_step(train(cfg)) == reference[1]


def test_resume_on_one_worker_sees_the_uninterrupted_samples(reference, make_job, tiny_data, replay_data):
    src_cfg, ref = reference
    cfg = mixed(make_job, tiny_data, replay_data, "run.name=mix-one", "scaling.workers=1",
                f"run.resume_from={run_dir(src_cfg)}/step000004")
    got = ids_by_step(train(cfg))
    assert sorted(got) == list(range(5, STEPS + 1))
    assert all(got[s] == ref[s] for s in got)
