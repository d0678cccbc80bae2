"""raypt's training throughput against a bare DeepSpeed loop: same model, same two processes, same data.

Both run the quickstart model under ZeRO-2 with the same DeepSpeed config, back to back, alternating, in one
invocation; the figure is the ratio of steady-state tokens/s (the first WARMUP steps are excluded from both).
The headline compares raypt as shipped with the loop as one would write it; `raypt_vs_bare_same_allocator` gives
the bare loop raypt's host-allocator setting too, so it isolates what the framework itself costs.
Usage: python benchmarks/overhead.py [--steps 60] [--rounds 2] [overrides...]
"""
from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402
from raypt.engine import accelerator, ds_config, keep_host_memory, param_groups  # noqa: E402

WARMUP = 5
JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")


def bare_worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, rows: np.ndarray, out: str,
                same_allocator: bool) -> None:
    """A plain DeepSpeed loop, as one would write it by hand: no Ray, no streaming, no metrics."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR=accelerator())
    import deepspeed
    import torch.distributed as dist

    from raypt.data.manifest import read_manifest
    from raypt.tasks import clm

    cfg = config.from_dict(cfg_dict)
    if same_allocator:
        keep_host_memory()
    if accelerator() == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    else:
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="nccl" if accelerator() == "cuda" else "gloo")
    model = clm.build_model(cfg, {"text": read_manifest(cfg.data.path)}, cfg.run.seed)
    # The same recipe (decay / no-decay groups) as raypt, so the ratio measures the framework, not the recipe.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, fused=accelerator() == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, world))
    dist.barrier()
    g, m = cfg.train.global_batch, cfg.train.micro_batch
    per_rank, accum = g // world, g // (m * world)
    data = torch.from_numpy(rows).long()
    times = []
    for step in range(steps):
        batch = data[(step * g + rank * per_rank) % len(data):][:per_rank]
        for k in range(accum):
            ids = batch[k * m:(k + 1) * m].to(engine.device)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        loss.item()
        times.append(time.time())
    dist.barrier()
    if rank == 0:
        np.save(out, np.array(times))


def run_bare(cfg, steps: int, same_allocator: bool = False) -> float:
    import pyarrow.parquet as pq
    import torch.multiprocessing as mp

    files = sorted(glob.glob(os.path.join(cfg.data.path, "train-*.parquet")))
    rows = np.concatenate([np.stack(pq.read_table(f).column("input_ids").to_numpy(zero_copy_only=False))
                           for f in files])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.npy")
        world = cfg.scaling.workers
        mp.start_processes(bare_worker, args=(world, port, config.to_dict(cfg), steps, rows, out, same_allocator), nprocs=world,
                           start_method="spawn")
        times = np.load(out)
    tokens = cfg.train.global_batch * rows.shape[1] * (steps - WARMUP)
    return tokens / (times[-1] - times[WARMUP - 1])


def run_raypt(cfg, steps: int, name: str) -> float:
    from raypt.launch import run_dir, train
    from raypt.metrics import read_metrics

    cfg = config.from_dict({**config.to_dict(cfg), "run": {**config.to_dict(cfg)["run"], "name": name}})
    train(cfg)
    records = {r["step"]: r for r in read_metrics(run_dir(cfg)) if r.get("loss") is not None}
    tokens = records[steps]["tokens_seen"] - records[WARMUP]["tokens_seen"]
    return tokens / (records[steps]["time"] - records[WARMUP]["time"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    storage = tempfile.mkdtemp(prefix="raypt-bench-")
    overrides = [f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"checkpoint.every={args.steps}",
                 f"run.storage={storage}", *args.overrides]
    cfg = config.load(JOB, overrides, check_data=False)
    if not os.path.exists(os.path.join(cfg.data.path, "manifest.json")):
        from raypt.data.prepare import prepare

        prepare(cfg.data.path, cfg.data.prepare)
    from raypt.launch import init_ray

    init_ray()
    bare, tuned, ours = [], [], []
    for i in range(args.rounds):
        bare.append(run_bare(cfg, args.steps))
        tuned.append(run_bare(cfg, args.steps, same_allocator=True))
        ours.append(run_raypt(cfg, args.steps, f"overhead-{i}"))
        print(f"round {i}: bare {bare[-1]:.0f} tokens/s, bare with raypt's allocator setting {tuned[-1]:.0f}, "
              f"raypt {ours[-1]:.0f}")
    # Medians of alternating rounds: robust to a noisy neighbour in any one round.
    figures = {"raypt_vs_bare_tokens_per_s": float(np.median(ours) / np.median(bare)),
               "raypt_vs_bare_same_allocator": float(np.median(ours) / np.median(tuned)),
               "raypt_tokens_per_s": float(np.median(ours)), "bare_tokens_per_s": float(np.median(bare)),
               "bare_same_allocator_tokens_per_s": float(np.median(tuned)),
               "rounds": args.rounds, "steps_timed": args.steps - WARMUP,
               "zero_stage": cfg.deepspeed.zero_stage, "workers": cfg.scaling.workers, "device": accelerator()}
    write_result("overhead", figures, per_round={"raypt": ours, "bare": bare, "bare_same_allocator": tuned})


if __name__ == "__main__":
    main()
