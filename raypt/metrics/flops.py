"""Peak FLOP/s for MFU: a datasheet number on known GPUs, else a measured fp32 matmul rate."""
from __future__ import annotations

import time

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


def measured_matmul_flops(threads: int, n: int = 512, repeats: int = 8) -> float:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a @ b
        best = float("inf")
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return 2 * n ** 3 / best
