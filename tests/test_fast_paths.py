"""Fast paths in the gloo tier: each switch trains to the losses the run has without it, and does what it says."""
from __future__ import annotations

import os

import pytest

from gloo import build, job, run_group, train

STEPS = 3


def recomputed(rank: int, world: int, out_dir: str, stage: int, stages: int, on: bool) -> dict:
    """Losses, and how often the blocks' MLPs were called in the first step (twice per micro-batch when
    recomputed: a pre-hook, since torch's recomputation stops once it has the tensors the backward needs)."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = job(stage, steps=STEPS, stages=stages, workers=world, fast={"activation_checkpointing": on})
    task, engine = build(cfg, world, rank)
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *_: calls.append(1)) for m in engine.ds.module.modules()
             if isinstance(m, LlamaMLP)]
    first = train(task, engine, range(1, 2))
    mlp_calls = len(calls)
    for h in hooks:
        h.remove()
    return {"losses": first + train(task, engine, range(2, STEPS + 1)), "mlp_calls": mlp_calls}


@pytest.mark.parametrize("stage, stages", [(2, 1), (1, 2)], ids=["zero2", "pipeline"])
def test_activation_checkpointing_recomputes_blocks_and_keeps_the_losses(tmp_path, stage, stages):
    runs = {}
    for on in (False, True):
        os.makedirs(out := str(tmp_path / str(on)))
        runs[on] = run_group(2, recomputed, out, stage=stage, stages=stages, on=on)
    for rank in range(2):
        assert runs[True][rank]["mlp_calls"] == 2 * runs[False][rank]["mlp_calls"] > 0, rank
        for a, b in zip(runs[True][rank]["losses"], runs[False][rank]["losses"]):
            assert abs(a - b) <= 1e-6, (rank, a, b)
