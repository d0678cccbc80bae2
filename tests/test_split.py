"""The gloo tier: any world size trains on the same global batch of 12 rows, with unequal shares where the ranks
do not divide it, and makes the very update the whole batch on one rank makes."""
from __future__ import annotations

import pytest

from gloo import build, job, run_group, train


def two_steps(rank: int, world: int, out_dir: str) -> dict:
    """Losses of steps 1-2 (step 2's shows step 1's update) and the full fp32 weights after them."""
    task, engine = build(job(2, steps=2), world, rank)
    losses = train(task, engine, range(1, 3))
    weights = {key: value.flatten()[:64].tolist() for key, _, value in engine.state_tensors()
               if value is not None and key.startswith("param/")}
    return {"losses": losses, "weights": weights, "micro_batches": engine.micro_batches}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    return run_group(1, two_steps, str(tmp_path_factory.mktemp("whole")))[0]


@pytest.mark.parametrize("world", [*(pytest.param(w, marks=pytest.mark.slow) for w in (2, 3, 4)),
                                   5])  # the fast tier keeps the most uneven split (3, 3, 2, 2, 2)
def test_unequal_shares_make_the_full_batch_update(whole, world, tmp_path):
    ranks = run_group(world, two_steps, str(tmp_path))
    assert ranks[0]["micro_batches"] == -(-12 // world)  # ceil(12 / world) micro-batches of one row on every rank
    assert max(abs(a - b) for a, b in zip(ranks[0]["losses"], whole["losses"])) <= 1e-6
    weights = {k: v for r in ranks for k, v in r["weights"].items()}  # each tensor from the rank that owns it
    assert weights.keys() == whole["weights"].keys()
    assert max(abs(a - b) for k in weights for a, b in zip(weights[k], whole["weights"][k])) <= 1e-6


def mae_steps(rank: int, world: int, out_dir: str) -> dict:
    """A DeepSpeed MAE run on one fixed image per sample, each row carrying its global place as the data stream
    gives it: every rank's masks for its share of 12 images over two steps, and the run's losses."""
    import torch

    from raypt.config import from_dict
    from raypt.data.split import Split
    from raypt.engines import Topology, select
    from raypt.metrics import CORE, Reducer
    from raypt.tasks import get_task
    from raypt.tasks.base import sample_noise

    cfg = from_dict({"model": {"task": "mae", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "patch_size": 4,
                               "decoder_hidden_size": 32, "decoder_layers": 1},
                     "data": {"image": {"size": 16}}, "train": {"global_batch": 12, "micro_batch": 2},
                     "deepspeed": {"zero_stage": 2}, "scaling": {"workers": 1}})
    task = get_task("mae")(cfg, {"image": {}})
    engine = select(cfg).build(task.build_model(0), cfg, Topology.data_parallel(world, rank))
    split, reduce = Split(12, world, 2), Reducer(CORE)
    images = torch.randn(12, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    losses, masks = [], {}
    for step in range(2):
        start, count = split.share(rank)
        places = torch.arange(step * 12 + start, step * 12 + start + count)
        batches = [{"pixel_values": images[places % 12][cut], "position": places[cut], "weight": w}
                   for cut, w in split.micro_slices(rank)]
        masks.update({int(p): sample_noise(p[None], cfg.run.seed, 16).argsort(1)[0, :4].tolist() for p in places})
        loss, _ = engine.train_step(iter(batches), task.loss)
        losses.append(reduce({"loss": loss})["loss"])
    return {"losses": losses, "masks": masks}


@pytest.mark.slow  # three MAE groups: with the Ray tier
def test_mae_ranks_draw_their_own_masks_and_any_world_size_the_same_run(tmp_path):
    whole = run_group(1, mae_steps, str(tmp_path))[0]
    assert len({tuple(m) for m in whole["masks"].values()}) > 20  # 24 samples, (nearly) as many masks
    for world in (2, 5):
        ranks = run_group(world, mae_steps, str(tmp_path))
        mine = [set(r["masks"]) for r in ranks]
        assert sum(map(len, mine)) == 24 and not set.intersection(*mine)  # each sample on exactly one rank
        assert {int(k): v for r in ranks for k, v in r["masks"].items()} == {int(k): v for k, v in
                                                                             whole["masks"].items()}
        assert max(abs(a - b) for a, b in zip(ranks[0]["losses"], whole["losses"])) <= 1e-5, world
