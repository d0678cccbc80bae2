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
