"""MFU on this machine's CPU, what each fast path buys, and tokens/s and MFU against model size.

Every run is `raypt train` as a user runs it, on one rank with all the machine's cores as threads, on the
quickstart's data: its per-step `mfu` is the model's FLOPs (raypt/metrics/flops.py, checked against torch's
counter) over the step time and the rank's own peak, the best fp32 rate of square matmuls of 256 to 2048 measured
in the rank's process on the same threads. Figures are medians over the steady steps (the first WARMUP, where
torch.compile compiles, are left out), and each with/without ratio comes from runs alternated in one invocation.
- `mfu_cpu_vs_matmul_peak`: the bench model (BENCH) with the best fast paths (BEST), target >= 0.5;
- `<switch>_on_vs_off_tokens_per_s`: each fast switch alone against none (activation checkpointing trades
  compute for memory, so it is below 1 by design; its HFU is reported beside);
- `sizes`: tokens/s and MFU at each of SIZES with BEST, drawn into benchmarks/results/mfu.png.
Usage: python benchmarks/mfu.py [--steps 16] [--rounds 2]; --plot: redraw the PNG from mfu.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import RESULTS, write_result  # noqa: E402

from raypt import config  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")
WARMUP = 4
BENCH = {"hidden_size": 512, "num_layers": 4, "num_heads": 8}
SIZES = [{"hidden_size": 128, "num_layers": 4, "num_heads": 4}, {"hidden_size": 256, "num_layers": 4, "num_heads": 4},
         BENCH, {"hidden_size": 768, "num_layers": 4, "num_heads": 12}]
SWITCHES = {"compile": {"compile": True}, "fused_optimizer": {"fused_optimizer": True},
            "activation_checkpointing": {"activation_checkpointing": True}}
BEST = {"compile": True, "fused_optimizer": True}


def run(model: dict, fast: dict, steps: int, storage: str, name: str) -> dict:
    """Steady-state medians of one run's tokens/s, mfu and hfu, and its parameter count."""
    from raypt.driver import train
    from raypt.metrics.sink import read_metrics

    threads = os.cpu_count() or 1
    overrides = [f"train.steps={steps}", f"train.eval_every={10 * steps}", f"checkpoint.every={steps}",
                 "train.global_batch=16", "train.micro_batch=16", "scaling.workers=1",
                 f"scaling.cpus_per_worker={threads}", f"run.storage={storage}", f"run.name={name}",
                 *(f"model.{k}={v}" for k, v in model.items()), *(f"fast.{k}={v}" for k, v in fast.items())]
    cfg = config.load(JOB, overrides)
    records = [r for r in read_metrics(train(cfg)) if r.get("loss") is not None]
    steady = [r for r in records if r["step"] > WARMUP]
    return {**{k: float(np.median([r[k] for r in steady])) for k in ("tokens_per_s", "mfu", "hfu")},
            "params": count_params(cfg)}


def count_params(cfg) -> int:
    """The model's parameters (tied ones once), built on the meta device."""
    import torch

    from raypt.data.manifest import read_manifest
    from raypt.tasks import get_task

    with torch.device("meta"):
        model = get_task(cfg.model.task)(cfg, {"text": read_manifest(cfg.data.path)}).construct()
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    storage = tempfile.mkdtemp(prefix="raypt-mfu-")
    off = {"fused_optimizer": False}
    rows: dict[str, list[dict]] = {name: [] for name in ("none", *SWITCHES, "best")}
    for i in range(args.rounds):  # alternating: each switch's runs sit between runs without it
        for name, fast in (("none", off), *((n, {**off, **f}) for n, f in SWITCHES.items()), ("best", BEST)):
            rows[name].append(run(BENCH, fast, args.steps, storage, f"{name}-{i}"))
            print(f"round {i} {name}: {rows[name][-1]}", flush=True)
    median = {name: {k: float(np.median([r[k] for r in rs])) for k in ("tokens_per_s", "mfu", "hfu")}
              for name, rs in rows.items()}
    sizes = []
    for k, model in enumerate(SIZES):
        got = median["best"] if model is BENCH else run(model, BEST, args.steps, storage, f"size-{k}")
        params = rows["best"][0]["params"] if model is BENCH else got["params"]
        sizes.append({**model, "params": params, "tokens_per_s": got["tokens_per_s"], "mfu": got["mfu"]})
    figures = {"mfu_cpu_vs_matmul_peak": median["best"]["mfu"], "best_fast_paths": sorted(BEST),
               "mfu_without_fast_paths": median["none"]["mfu"],
               **{f"{n}_on_vs_off_tokens_per_s": median[n]["tokens_per_s"] / median["none"]["tokens_per_s"]
                  for n in SWITCHES},
               "best_vs_none_tokens_per_s": median["best"]["tokens_per_s"] / median["none"]["tokens_per_s"],
               "activation_checkpointing_hfu": median["activation_checkpointing"]["hfu"],
               "bench_model": BENCH, "threads": os.cpu_count(), "rounds": args.rounds,
               "steps_timed": args.steps - WARMUP, "sizes": sizes}
    write_result("mfu", figures, per_round=rows)
    plot(sizes)


def plot(sizes: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = [s["params"] / 1e6 for s in sizes]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(params, [s["tokens_per_s"] for s in sizes], "o-", color="tab:blue")
    ax.set_xscale("log")
    ax.set_xticks(params, [f"{p:.1f}" for p in params])
    ax.minorticks_off()
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("tokens/s", color="tab:blue")
    mfu = ax.twinx()
    mfu.plot(params, [100 * s["mfu"] for s in sizes], "s--", color="tab:red")
    mfu.set_ylabel("MFU (% of the measured fp32 matmul peak)", color="tab:red")
    ax.set_title("raypt on this machine's CPU: 1 rank, best fast paths")
    fig.tight_layout()
    fig.savefig(RESULTS / "mfu.png", dpi=120)
    print(f"wrote {RESULTS / 'mfu.png'}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--plot"]:
        import json

        plot(json.loads((RESULTS / "mfu.json").read_text())["figures"]["sizes"])
    else:
        main()
