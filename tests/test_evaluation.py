"""Per-source validation losses and evaluation-only datasets (raypt.evaluation), without Ray: the mix's val_loss as
the sources' losses weighted by the weights in force, the per-sample mean at any split, the config and preflight
checks of data.eval_sources, and where the per-source keys go (summary, TensorBoard, a sweep's metric)."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from raypt import config, preflight
from raypt.data.mix import MixPlan
from raypt.data.split import Split
from raypt.evaluation import Evaluator, mixed

# code 3 : replay 1, then 1 : 1 from 768 tokens on (256 tokens per global batch of 8: from step 3's tokens seen)
MIX = ["data.sources=[{name: code, path: /d/code, weight: 3}, {name: replay, path: /d/replay, weight: 1}]",
       "data.stages=[{at_tokens: 768, weights: {code: 1, replay: 1}}]", "train.global_batch=8"]


def manifest(folder, **fields) -> str:
    """A prepared dataset as preflight sees it: its manifest alone."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump({"seq_len": 32, "tokenizer_sha256": "abc", **fields}, f)
    return str(folder)


class Engine:
    """Stands in for an engine at evaluation: a batch's loss is the mean of its rows' `loss` values."""
    dp_size, dp_rank, device = 1, 0, None

    def eval_step(self, batch: dict, loss_fn) -> tuple[torch.Tensor, dict]:
        assert "weight" not in batch
        return batch["loss"].mean(), {}


def test_mixed_weights_each_source_by_its_share_and_leaves_out_weight_zero():
    assert mixed([2.0, 4.0], [3, 1]) == 2.5
    assert mixed([2.0, 4.0], [1, 1]) == 3.0
    assert mixed([2.0, math.inf], [1, 0]) == 2.0  # a source at weight 0 adds nothing, whatever its loss


@pytest.mark.parametrize("weight", [1.0, 0.3, 7.0])
def test_one_source_mix_is_that_source_s_loss_exactly(weight):
    """A run on data.path alone: its val_loss stays the very number it was before per-source losses."""
    for loss in np.random.default_rng(0).uniform(0, 12, 100):
        assert mixed([float(loss)], [weight]) == float(loss)


def test_evaluator_mixes_by_the_weights_in_force_at_the_step_and_never_the_eval_only_source(tmp_path):
    old = manifest(tmp_path / "old")
    cfg = config.load(None, [*MIX, f"data.eval_sources=[{{name: old, path: {old}}}]"], check_data=False)
    evaluator = Evaluator(cfg, [{}, {}], Engine(), loss=None)
    evaluator.reduce = lambda values, device: values  # one rank: the ranks' mean is its own value
    rows = {"code": 2.0, "replay": 4.0, "old": 100.0}
    val = [[{"loss": torch.full((2,), rows[n]), "weight": 1.0}] for n in ("code", "replay", "old")]
    plan = MixPlan(cfg.data.stage_weights(), 8, [32, 32])
    assert [plan.stage(step) for step in (0, 2, 3, 8)] == [0, 0, 1, 1]  # 768 tokens are seen after step 3
    before, after = evaluator(val, plan.stage(2)), evaluator(val, plan.stage(3))
    assert before == {"val_loss": (3 * 2.0 + 1 * 4.0) / 4, "val_loss/code": 2.0, "val_loss/replay": 4.0,
                      "val_loss/old": 100.0}
    assert after["val_loss"] == (2.0 + 4.0) / 2


def test_a_source_s_loss_is_the_mean_over_its_samples_at_an_uneven_split():
    """5 samples over 2 ranks (3 + 2 rows, micro-batches of up to 2): rows weighted as in training."""
    losses = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    evaluator = Evaluator(config.load(None, MIX, check_data=False), [{}, {}], Engine(), loss=None)
    split, means = Split(5, 2, 2), []
    for rank in range(2):
        first = split.share(rank)[0]
        batches = [{"loss": losses[first + rows.start:first + rows.stop], "weight": weight}
                   for rows, weight in split.micro_slices(rank)]
        means.append(evaluator.mean_loss(batches))
    assert sum(means) / 2 == pytest.approx(31 / 5, abs=1e-12)


@pytest.mark.parametrize("eval_sources, names", [
    ("[{name: code, path: /d/x}]", "data.eval_sources.0.name: got 'code', which another source already names"),
    ("[{name: a, path: /d/x}, {name: a, path: /d/y}]", "data.eval_sources.1.name: got 'a'"),
])
def test_eval_source_names_must_differ_from_the_mix_and_each_other(eval_sources, names):
    with pytest.raises(config.ConfigError, match=names):
        config.load(None, [*MIX, f"data.eval_sources={eval_sources}"], check_data=False)
    with pytest.raises(config.ConfigError, match="data.eval_sources.0.name: got 'main'"):
        config.load(None, ["data.eval_sources=[{name: main, path: /d/x}]"], check_data=False)


def test_eval_sources_leave_the_trajectory_alone_and_their_paths_are_found(tmp_path):
    base = config.load(None, MIX, check_data=False)
    cfg = config.load(None, [*MIX, "data.eval_sources=[{name: old, path: data/old}]"], check_data=False)
    assert cfg.trajectory() == base.trajectory() and cfg.digest() == base.digest()
    assert ("data.eval_sources.0.path", os.path.abspath("data/old")) in list(preflight.locations(cfg))
    assert cfg.data.evaluated() == ["code", "replay", "old"]


@pytest.mark.parametrize("fields, expected", [
    (None, r"data.eval_sources.0.path: '.*old' holds no prepared dataset"),
    ({"seq_len": 64}, r"data.eval_sources.0.path: .* packs sequences of 64 tokens; the mix's text packs 32"),
    ({"tokenizer_sha256": "other"}, r"data.eval_sources.0.path: .* was tokenized with another tokenizer"),
    ({"modality": "image"}, r"data.eval_sources.0.path: .* holds image data; .* the mix trains on \(text\)"),
])
def test_preflight_refuses_an_eval_source_the_model_cannot_read_as_the_mix(tmp_path, fields, expected):
    old = manifest(tmp_path / "old", **fields) if fields is not None else str(tmp_path / "old")
    cfg = config.load(None, [f"data.path={manifest(tmp_path / 'main')}",
                             f"data.eval_sources=[{{name: old, path: {old}}}]"], check_data=False)
    with pytest.raises(config.ConfigError, match=expected):
        preflight.check_data_path(cfg)


def test_a_matching_eval_source_passes_preflight(tmp_path):
    cfg = config.load(None, [f"data.path={manifest(tmp_path / 'main')}",
                             f"data.eval_sources=[{{name: old, path: {manifest(tmp_path / 'old')}}}]"],
                      check_data=False)
    assert len(preflight.check_data_path(cfg)) == 1  # the mix's manifests


def test_a_sweep_may_optimise_one_source_s_loss():
    from raypt.tune.sweep import SweepConfig, check_metric

    cfg = config.load(None, [*MIX, "data.eval_sources=[{name: old, path: /d/old}]"], check_data=False)
    for metric in ("val_loss", "val_loss/code", "val_loss/old"):
        check_metric(SweepConfig(name="s", base="job.yaml", search={}, metric=metric), cfg)
    with pytest.raises(config.ConfigError, match=r"metric: got 'val_loss/python'.*val_loss/replay"):
        check_metric(SweepConfig(name="s", base="job.yaml", search={}, metric="val_loss/python"), cfg)


def test_summary_and_tensorboard_carry_each_source_s_loss(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from raypt.driver import summarize
    from raypt.metrics.sink import Sink

    records = [{"step": s, "loss": 3.0, "tokens_seen": 64 * s, "tokens_per_s": 1.0, "mfu": 0.1, "step_time_s": 1.0,
                "data_wait_s": 0.0, "val_loss": 3.0 - s, "val_loss/code": 2.0 - s, "val_loss/old": 9.0}
               for s in (1, 2)]
    summary = summarize(records, 1.0)
    assert summary["final_val_loss"] == 1.0 and summary["final_val_loss/code"] == 0.0
    assert summary["final_val_loss/old"] == 9.0
    sink = Sink(str(tmp_path))
    sink.begin(0)
    sink.log(records)
    sink.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("val_loss/code")] == [1.0, 0.0]
