"""The FLOPs MFU and HFU count, against torch's FlopCounterMode on each task's real model and step (forward and
backward; torch's own SDPA formulas for the CPU flash-attention kernel, which the counter does not map), and the
recomputation activation checkpointing adds."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from test_tasks import TEXT, images, job, mae_task
from raypt import config
from raypt.models.recompute import checkpoint_blocks
from raypt.tasks import clm, multimodal

aten = torch.ops.aten
SDPA_ON_CPU = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(grad, q, k, v),
}
ROWS = 4


def counted(task, model, batch: dict) -> float:
    """FLOPs of one step's forward and backward per sample, as torch counts them."""
    model.train()
    with FlopCounterMode(display=False, custom_mapping=SDPA_ON_CPU) as counter:
        task.loss(model, batch)[0].backward()
    return counter.get_total_flops() / ROWS


def multimodal_task() -> multimodal.MultimodalTask:
    """Every modality 16 tokens long: the count is of each sample's own tokens, and here none is padded."""
    cfg = config.from_dict({
        "model": {"task": "multimodal", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "patch_size": 4},
        "data": {"image": {"size": 16}, "audio": {"sample_rate": 1600, "seconds": 1.0, "n_mels": 8, "hop": 25}}})
    return multimodal.MultimodalTask(cfg, {"text": {**TEXT, "seq_len": 16}, "image": {}, "audio": {}})


def cases():
    g = torch.Generator().manual_seed(0)
    yield "clm", clm.ClmTask(job("clm"), {"text": TEXT}), "text", {"input_ids": torch.randint(0, 64, (ROWS, 12))}
    yield "mae", mae_task(), "image", {"pixel_values": images(ROWS), "position": torch.arange(ROWS)}
    mm = multimodal_task()
    yield "multimodal-text", mm, "text", {"input_ids": torch.randint(0, 64, (ROWS, 16), generator=g)}
    yield "multimodal-image", mm, "image", {"pixel_values": images(ROWS)}
    yield "multimodal-audio", mm, "audio", {"audio_features": torch.randn(ROWS, 8, 65, generator=g)}


@pytest.mark.parametrize("name, task, modality, batch", list(cases()), ids=[c[0] for c in cases()])
def test_flops_per_sample_and_the_recomputation_match_torchs_count(name, task, modality, batch):
    plain = task.build_model(seed=0)
    assert task.flops_per_sample(plain, modality) == pytest.approx(counted(task, plain, batch), rel=0.05)
    recomputing = checkpoint_blocks(task.build_model(seed=0))
    extra = counted(task, recomputing, batch) - counted(task, plain, batch)
    assert extra > 0
    assert task.recompute_flops_per_sample(plain, modality) == pytest.approx(extra, rel=0.05)


def test_hfu_counts_the_recomputation_only_when_activation_checkpointing_is_on():
    from raypt.config.fast import FastConfig
    from raypt.metrics.flops import sample_flops

    task = multimodal_task()
    model = task.build_model(seed=0)
    off, on = (sample_flops(task, model, ["text", "audio"], FastConfig(activation_checkpointing=a))
               for a in (False, True))
    assert (off[0] == off[1]).all() and (on[0] == off[0]).all()
    assert list(on[1] - on[0]) == [task.recompute_flops_per_sample(model, m) for m in ("text", "audio")]


def test_the_peak_is_the_datasheets_in_the_runs_precision_or_a_measured_rate(monkeypatch):
    from raypt.metrics import flops

    measured = flops.peak_flops(1, "fp32")
    assert 1e8 < measured < 1e13  # a real fp32 rate of this machine's one thread
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 PCIe")
    assert flops.peak_flops(1, "auto") == flops.peak_flops(1, "bf16") == 756e12  # PCIe, not the SXM's
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert flops.peak_flops(1, "fp32") == 378e12  # tf32 tensor cores
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "highest")
    assert flops.peak_flops(1, "fp32") == 51e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert flops.peak_flops(1, "fp16") == 989e12
