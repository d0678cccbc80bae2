"""What the rank runs on: the accelerator and precision, auto-detected, and host-memory settings for CPU ranks."""
from __future__ import annotations

import ctypes
import sys

import torch

# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_host_memory(training: bool = True) -> None:
    """Training: stop glibc handing each step's freed activations back to the kernel only to fault them in again
    on the next step. Ray Train runs the loop on a non-main thread, whose malloc arena grows in small mmapped heaps:
    on the quickstart's ranks this was 9-13k page faults per step, and 1.5k with these settings.
    Building (`training=False`): the opposite, so that the transient full tensors of a partitioned build and of a
    restore (each module's weights before ZeRO-3 slices them, a tensor read from a checkpoint) go back to the
    kernel when freed: glibc's dynamic threshold otherwise keeps them resident, 0.85 of a 2-rank ZeRO-3 model's
    full size instead of its half. A fixed threshold also ends that adjustment, whatever earlier frees did."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library: leave its defaults
        return
    settings = ((M_MMAP_THRESHOLD, 32 << 20), (M_TOP_PAD, 64 << 20), (M_TRIM_THRESHOLD, 512 << 20)) if training \
        else ((M_MMAP_THRESHOLD, 256 << 10), (M_TOP_PAD, 0), (M_TRIM_THRESHOLD, 1 << 20))
    for option, value in settings:
        mallopt(option, value)


def accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(requested: str) -> str:
    """`auto`: bf16 on GPUs that have it, else fp16 on GPUs; fp32 on CPUs."""
    if requested != "auto":
        return requested
    if accelerator() == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
