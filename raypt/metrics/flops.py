"""FLOPs for MFU and HFU: each task's count per sample (checked against torch's FlopCounterMode in
tests/test_flops.py) and the peak in the run's precision, a datasheet number on known GPUs, else a measured
matmul rate.

MFU counts the model's FLOPs of each sample's own tokens (padding is no useful work); HFU adds what the hardware
computes again under activation checkpointing. On CPU the peak is the best rate of square matmuls of 256 to 2048
in the run's precision (fp32 unless bf16 is asked for) on the rank's own threads, measured in the rank's process
as it starts."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

# Dense peaks (FLOP/s) of the GPUs pre-training runs on, by datasheet: (fp32, tf32, bf16/fp16) tensor-core rates,
# tf32 = fp32 where the GPU has no tf32 path, bf16 = fp16 where it has fp16 only; matched by substring of the
# device name, the most specific first.
GPU_PEAK_FLOPS = {
    "H200": (67e12, 495e12, 989e12), "H100 SXM": (67e12, 495e12, 989e12), "H100 NVL": (60e12, 418e12, 835e12),
    "H100 PCIe": (51e12, 378e12, 756e12), "H100": (67e12, 495e12, 989e12), "GH200": (67e12, 495e12, 989e12),
    "B200": (80e12, 1100e12, 2250e12), "B100": (60e12, 875e12, 1750e12), "A100": (19.5e12, 156e12, 312e12),
    "A800": (19.5e12, 156e12, 312e12), "L40S": (91.6e12, 183e12, 362e12), "L40": (90.5e12, 90.5e12, 181e12),
    "L4": (30.3e12, 60e12, 121e12), "A10G": (31.2e12, 62.5e12, 125e12), "A10": (31.2e12, 62.5e12, 125e12),
    "V100": (15.7e12, 15.7e12, 125e12), "T4": (8.1e12, 8.1e12, 65e12), "RTX 4090": (82.6e12, 82.6e12, 165e12),
    "RTX 3090": (35.6e12, 35.6e12, 71e12),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_flops(threads: int, precision: str = "auto") -> float:
    """Peak per worker in the run's precision (`deepspeed.precision`, auto resolved as the engine resolves it):
    on a known GPU its datasheet rate (fp32 matmuls at the tf32 rate unless torch keeps them at "highest"), else
    the measured best rate of matmuls in that precision."""
    from raypt.engines.device import precision as resolve

    prec = resolve(precision)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, (fp32, tf32, half) in GPU_PEAK_FLOPS.items():
            if key in name:
                if prec != "fp32":
                    return half
                return fp32 if torch.get_float32_matmul_precision() == "highest" else tf32
    return measured_matmul_flops(threads, DTYPES[prec])


def sample_flops(task: Any, model: torch.nn.Module, modalities: list[str], fast: Any) -> np.ndarray:
    """Per source (rows: model FLOPs, hardware FLOPs) of one training sample; `fast`: the job's fast: section."""
    model_flops = [task.flops_per_sample(model, m) for m in modalities]
    extra = [task.recompute_flops_per_sample(model, m) if fast.activation_checkpointing else 0.0 for m in modalities]
    return np.array([model_flops, np.add(model_flops, extra)])


def measured_matmul_flops(threads: int, dtype: torch.dtype = torch.float32,
                          sizes: tuple[int, ...] = (256, 512, 1024, 2048), seconds: float = 0.1) -> float:
    """The best rate of n x n matmuls in `dtype` over `sizes`, each repeated for about `seconds` after a warm-up
    (about a second in all on one CPU thread)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        for n in sizes:
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
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
