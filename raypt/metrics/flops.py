"""FLOPs for MFU and HFU: each task's count per sample (checked against torch's FlopCounterMode in
tests/test_flops.py) and the peak, a datasheet number on known GPUs, else a measured fp32 matmul rate.

MFU counts the model's FLOPs of each sample's own tokens (padding is no useful work); HFU adds what the hardware
computes again under activation checkpointing. On CPU the peak is the best fp32 rate of square matmuls of 256 to
2048 on the rank's own threads, measured in the rank's process as it starts."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

# Dense bf16 tensor-core peaks (FLOP/s) of the GPUs pre-training runs on; matched by substring of the device name.
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
    "GH200": 989e12, "B200": 2250e12, "B100": 1750e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
    "L40": 181e12, "L4": 121e12, "A10G": 125e12, "A10": 125e12, "V100": 125e12, "T4": 65e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12,
}


def peak_flops(threads: int) -> float:
    """Peak per worker: the datasheet number on a known GPU, else a measured fp32 matmul rate."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_FLOPS.items():
            if key in name:
                return value
    return measured_matmul_flops(threads)


def sample_flops(task: Any, model: torch.nn.Module, modalities: list[str], fast: Any) -> np.ndarray:
    """Per source (rows: model FLOPs, hardware FLOPs) of one training sample; `fast`: the job's fast: section."""
    model_flops = [task.flops_per_sample(model, m) for m in modalities]
    extra = [task.recompute_flops_per_sample(model, m) if fast.activation_checkpointing else 0.0 for m in modalities]
    return np.array([model_flops, np.add(model_flops, extra)])


def measured_matmul_flops(threads: int, sizes: tuple[int, ...] = (256, 512, 1024, 2048), seconds: float = 0.1
                          ) -> float:
    """The best rate of fp32 n x n matmuls over `sizes`, each repeated for about `seconds` after a warm-up (about
    a second in all on one CPU thread)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        for n in sizes:
            a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
            a @ b
            spent = 0.0
            while spent < seconds:
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                a @ b
                if device == "cuda":
                    torch.cuda.synchronize()
                took = time.perf_counter() - t
                spent, best = spent + took, max(best, 2 * n ** 3 / took)
    finally:
        torch.set_num_threads(before)
    return best
