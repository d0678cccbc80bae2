"""Step metrics: MFU against a known or measured peak, and one sink that writes metrics.jsonl and TensorBoard."""
from __future__ import annotations

import json
import os
import time

import ray
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


@ray.remote(num_cpus=0)
class MetricsSink:
    """Lives beside the driver; rank 0 sends records without waiting, the driver polls for progress."""

    def __init__(self, run_dir: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        self.latest: dict = {}
        self.events: list[str] = []
        self.pending: list[dict] = []
        self.writer = None

    def begin(self, start_step: int) -> None:
        """A (re)started attempt: drop records past the step it resumes from, so each step appears once."""
        self.flush()
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= start_step]
        with open(self.path, "w") as f:
            f.writelines(kept)
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir, purge_step=start_step + 1)

    def log(self, records: list[dict]) -> None:
        self.pending.extend(records)
        for record in records:
            self.latest = {**self.latest, **record}

    def flush(self) -> None:
        """Written in batches (on every poll) so per-step logging costs the ranks' CPUs almost nothing."""
        if not self.pending:
            return
        with open(self.path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.pending)
        for record in self.pending:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
        self.pending = []

    def note(self, message: str) -> None:
        self.events.append(message)

    def poll(self) -> tuple[dict, list[str]]:
        self.flush()
        events, self.events = self.events, []
        return self.latest, events

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
