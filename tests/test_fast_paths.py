"""Fast paths in the gloo tier: each switch trains to the losses the run has without it, and does what it says."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

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


def switched(rank: int, world: int, out_dir: str, fast: dict) -> dict:
    """Losses with the `fast` switches, and what the built engine shows of them."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    task, engine = build(job(1, steps=STEPS, workers=world, fast=fast), world, rank)
    blocks = [m for m in engine.ds.module.modules() if isinstance(m, GradientCheckpointingLayer)]
    return {"losses": train(task, engine, range(1, STEPS + 1)),
            "compiled": [b._compiled_call_impl is not None for b in blocks],
            "names": [n for n, _ in engine.ds.module.named_parameters()],
            "fused": [bool(g.get("fused")) for g in engine._base().param_groups]}


@pytest.mark.slow  # torch.compile's first compile (about 30 s): with the Ray tier, so the fast tier stays quick
def test_compiled_blocks_and_the_fused_optimizer_keep_the_losses_and_the_names(tmp_path):
    runs = {}
    for name, fast in (("eager", {"fused_optimizer": False}), ("compile", {"compile": True}),
                       ("fused", {"fused_optimizer": True})):
        os.makedirs(out := str(tmp_path / name))
        runs[name] = run_group(1, switched, out, fast=fast)[0]
    eager = runs["eager"]
    assert runs["compile"]["compiled"] and all(runs["compile"]["compiled"]) and not any(eager["compiled"])
    assert runs["compile"]["names"] == eager["names"]  # in place: checkpoints by the same names
    assert all(runs["fused"]["fused"]) and not any(eager["fused"])
    for name in ("compile", "fused"):
        for a, b in zip(runs[name]["losses"], eager["losses"], strict=True):
            assert abs(a - b) <= 1e-5, (name, a, b)  # fused kernels sum in another order


def pinned(rank: int, world: int, out_dir: str) -> dict:
    try:
        build(job(1, steps=STEPS, workers=world, fast={"pin_memory": True}), world, rank)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def test_pinned_batches_on_a_cpu_rank_are_an_error(tmp_path):
    (result,) = run_group(1, pinned, str(tmp_path))  # the gloo tier's ranks are CPU ranks, on any machine
    assert result == {"error": "fast.pin_memory: true needs a CUDA device; this rank runs on cpu"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host batches copy to a CUDA device; this "
                    "machine has none (benchmarks/gpu_check.py runs this check on a GPU machine)")
def test_pinned_non_blocking_copies_keep_the_losses():
    """On one CUDA rank in its own process (the gloo tier's ranks are CPU ranks): the GPU check's pinned part."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.py")
    done = subprocess.run([sys.executable, script, "--pinned"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"pinned_engine": True, "pinned_losses_max_abs_diff": 0.0}
