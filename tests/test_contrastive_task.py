"""The contrastive task (AMCL and SimCLR) without Ray: its config's refusals, the model's loss against the loss
module's, the probe's classifiers, the encoder export, and (gloo tier) 2 workers against 1 under ZeRO-2 and 3."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raypt import config
from raypt.config import ConfigError
from raypt.contrastive import TemperatureNet, amcl_loss, simclr_loss
from raypt.contrastive.probe import knn_accuracy, linear_probe
from raypt.tasks import get_task

from gloo import run_group

SIZES = {"task": "contrastive", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "patch_size": 4,
         "proj_dim": 16, "phi_hidden": 16, "topk": 8}
SIMCLR = {"heads": 1, "temperature": "fixed", "tau": 0.5, "negatives": "logsumexp"}


def job(stage: int = 2, **model):
    return config.from_dict({"model": {**SIZES, **model}, "data": {"image": {"size": 16, "views": 2}},
                             "train": {"global_batch": 12, "micro_batch": 12, "lr": 3e-3, "grad_clip": 0.0},
                             "deepspeed": {"zero_stage": stage}, "scaling": {"workers": 1}})


def views(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, 2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("override, message", [
    ("data.image.views=1", "data.image.views: got 1; model.task contrastive learns from two augmented views"),
    ("model.patch_size=5", "model.patch_size: 5 does not divide data.image.size \\(16\\)"),
    ("train.micro_batch=4", "train.micro_batch: 4 is less than a rank's share of train.global_batch at the "
     "smallest world size \\(6\\)"),
    ("model.tau_min=2.0", "model.tau_min: 2.0 must be below model.tau_max \\(2.0\\)"),
])
def test_a_job_the_task_cannot_run_is_refused_naming_the_field(override, message):
    base = ["model.task=contrastive", "data.image.size=16", "data.image.views=2", "train.global_batch=12",
            "train.micro_batch=6", "scaling.workers={min: 2, max: 3}"]
    config.load(None, base, check_data=False)  # the share at 2 workers is 6: accepted
    with pytest.raises(ConfigError, match=message):
        config.load(None, [*base, override], check_data=False)


def test_amcl_model_loss_is_the_loss_modules_on_its_heads_with_grads_everywhere():
    cfg = job(heads=3)
    task = get_task("contrastive")(cfg, {"image": {}})
    model = task.build_model(0)
    x = views(6)
    loss, metrics = task.loss(model, {"pixel_values": x})
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(metrics) == {m.name for m in task.metrics}  # every value declared, per head too
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        h = model(pixel_values=x.flatten(0, 1), features_only=True)
        z = torch.stack([head(h) for head in model.heads], 1).unflatten(0, (6, 2))
        want, _ = amcl_loss(z[:, 0], z[:, 1], model.temperature, beta=1e-4, neg_agg="topk_mean", topk=8)
        assert isinstance(model.temperature, TemperatureNet) and len(model.heads) == 3
        assert task.loss(model, {"pixel_values": x})[0].item() == pytest.approx(want.item(), rel=1e-6)
        heads = [model.heads[c][2].weight for c in range(3)]
        assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])  # independent heads


def test_simclr_is_one_head_at_a_fixed_temperature_with_nt_xent():
    task = get_task("contrastive")(job(**SIMCLR), {"image": {}})
    model = task.build_model(0)
    x = views(6)
    with torch.no_grad():
        loss, metrics = task.loss(model, {"pixel_values": x})
        h = model(pixel_values=x.flatten(0, 1), features_only=True)
        z = model.heads[0](h).unflatten(0, (6, 2))
        assert loss.item() == pytest.approx(simclr_loss(z[:, 0], z[:, 1], 0.5)[0].item(), rel=1e-6)
    assert len(model.heads) == 1 and not any("temperature" in n for n, _ in model.named_parameters())
    assert metrics["tau_pos_mean"].item() == pytest.approx(0.5) and metrics["omega"].item() != 0


def test_probe_and_knn_score_features_that_carry_the_label_and_not_ones_that_do_not():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 400)
    centres = rng.normal(size=(5, 16)) * 3
    informative = centres[labels] + rng.normal(size=(400, 16))
    noise = rng.normal(size=(400, 16))
    train, test = slice(0, 300), slice(300, 400)
    for classify in (lambda a, b: linear_probe(a, b), lambda a, b: knn_accuracy(a, b, k=10)):
        good = classify((informative[train], labels[train]), (informative[test], labels[test]))
        bad = classify((noise[train], labels[train]), (noise[test], labels[test]))
        assert good > 0.95 and bad < 0.4, (good, bad)


def test_export_is_the_encoder_alone_for_automodel(tmp_path):
    from transformers import AutoImageProcessor, AutoModel

    task = get_task("contrastive")(job(), {"image": {}})
    model = task.build_model(0)
    task.export(model, str(tmp_path))
    loaded = AutoModel.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "ViTModel"
    x = views(3)[:, 0]
    with torch.no_grad():
        want = model(pixel_values=x, features_only=True)
        got = loaded(pixel_values=x).last_hidden_state.mean(1)  # the features the export's docs name
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert AutoImageProcessor.from_pretrained(str(tmp_path)).size == {"height": 16, "width": 16}


def contrastive_steps(rank: int, world: int, out_dir: str, stage: int) -> dict:
    """Three DeepSpeed steps of AMCL on one global batch of 12 two-view images, each rank its share; the run's
    losses and metrics, and every full fp32 weight after them."""
    from raypt.data.split import Split
    from raypt.engines import Topology, select
    from raypt.metrics import CORE, Reducer

    cfg = job(stage, heads=2)
    task = get_task("contrastive")(cfg, {"image": {}})
    engine = select(cfg).build(task.build_model(0), cfg, Topology.data_parallel(world, rank))
    split, reduce = Split(12, world, 12), Reducer([*CORE, *task.metrics])
    start, count = split.share(rank)
    losses = []
    rows = views(12)[start:start + count]
    for step in range(3):
        batches = iter({"pixel_values": rows[cut], "weight": w} for cut, w in split.micro_slices(rank))
        loss, metrics = engine.train_step(batches, task.loss)
        losses.append(reduce({"loss": loss, **metrics}))
    weights = {k: v.flatten().tolist() for k, _, v in engine.state_tensors() if v is not None and k[:6] == "param/"}
    return {"losses": losses, "weights": weights}


@pytest.mark.slow  # 2 gloo groups of a ViT each stage (44 s for ZeRO-2): with the Ray tier
@pytest.mark.parametrize("stage", [2, 3])
def test_two_workers_make_the_one_worker_losses_and_updates(stage, tmp_path):
    """Negatives gathered with gradients: 2 x 6 rows compute what 12 rows on one rank do, step after step."""
    whole = run_group(1, contrastive_steps, str(tmp_path), stage=stage)[0]
    ranks = run_group(2, contrastive_steps, str(tmp_path), stage=stage)
    for got, want in zip(ranks[0]["losses"], whole["losses"]):  # the stds combine over ranks only roughly
        assert set(got) == set(want)
        assert all(abs(got[k] - want[k]) <= 1e-4 * max(1, abs(want[k])) for k in want if not k.endswith("_std"))
    assert whole["losses"][2]["loss"] < whole["losses"][0]["loss"] - 1e-3  # it trains: the updates are real
    weights = {k: v for r in ranks for k, v in r["weights"].items()}
    assert weights.keys() == whole["weights"].keys()
    assert max(abs(a - b) for k in weights for a, b in zip(weights[k], whole["weights"][k])) <= 1e-4
