"""raypt's training throughput against a bare DeepSpeed loop: same model, same processes, same data.

Both run the quickstart model under ZeRO-2 with the same DeepSpeed config, back to back, alternating, in one
invocation, at one rank (one thread, so a core is spare for Ray's processes, as on a GPU node) and at two ranks
(one per core, where every other process takes its cycles from a rank); the figure is the ratio of steady-state
tokens/s (the first WARMUP steps are excluded from both). The bare loop is a plain torch.distributed launch
(processes started by torch with env:// rendezvous, as `torchrun` or `deepspeed` would) while no Ray cluster
runs; raypt runs as shipped, on its embedded cluster with its data feed and control processes, started for each
run and stopped after it. `raypt_vs_bare_same_allocator_*` gives the bare loop raypt's host-allocator setting
too, so it isolates what the framework itself costs. Per-process CPU is sampled throughout, so each timed window
splits into the cores the ranks got and the cores every other process took from them.
Usage: python benchmarks/overhead.py [--steps 60] [--rounds 3] [--workers 1 2] [overrides...]
"""
from __future__ import annotations

import argparse
import glob
import os
import socket
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

from raypt import config  # noqa: E402
from raypt.engines.device import accelerator, keep_host_memory  # noqa: E402
from raypt.engines.zero import ds_config, param_groups  # noqa: E402

WARMUP = 5
JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")


class CpuMeter:
    """Every process's CPU seconds, once a second, in a background thread of the driver."""

    def __init__(self):
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def sample(self) -> None:
        while not self.stopped.wait(1.0):
            cpu = {}
            for p in psutil.process_iter(["cpu_times"]):
                if p.info["cpu_times"] is not None:
                    cpu[p.pid] = p.info["cpu_times"].user + p.info["cpu_times"].system
            self.samples.append((time.time(), cpu))

    def split(self, t0: float, t1: float, ranks: int) -> dict:
        """Cores used over [t0, t1] by the `ranks` busiest processes (the ranks) and by all the others."""
        (ta, a), (tb, b) = (min(self.samples, key=lambda s: abs(s[0] - t)) for t in (t0, t1))
        used = sorted((b[pid] - a[pid] for pid in b if pid in a), reverse=True)
        return {"rank_cores": sum(used[:ranks]) / (tb - ta), "other_cores": sum(used[ranks:]) / (tb - ta)}

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join()


def bare_worker(rank: int, world: int, port: int, cfg_dict: dict, steps: int, rows: np.ndarray, out: str,
                same_allocator: bool) -> None:
    """A plain DeepSpeed loop, as one would write it by hand: no Ray, no streaming, no metrics."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR=accelerator())
    import deepspeed
    import torch.distributed as dist

    from raypt.data.manifest import read_manifest
    from raypt.data.split import Split
    from raypt.tasks import clm

    cfg = config.from_dict(cfg_dict)
    if same_allocator:
        keep_host_memory()
    if accelerator() == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    else:
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="nccl" if accelerator() == "cuda" else "gloo")
    model = clm.ClmTask(cfg, {"text": read_manifest(cfg.data.path)}).build_model(cfg.run.seed)
    # The same recipe (decay / no-decay groups) as raypt, so the ratio measures the framework, not the recipe.
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=cfg.train.lr, betas=cfg.train.betas,
                                  weight_decay=cfg.train.weight_decay, fused=accelerator() == "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(cfg, Split(cfg.train.global_batch, world, cfg.train.micro_batch)))
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


def run_bare(cfg, steps: int, same_allocator: bool = False) -> tuple[float, tuple[float, float]]:
    """Steady-state tokens/s and the timed window's wall-clock bounds."""
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
        mp.start_processes(bare_worker, args=(world, port, config.to_dict(cfg), steps, rows, out, same_allocator),
                           nprocs=world, start_method="spawn")
        times = np.load(out)
    tokens = cfg.train.global_batch * rows.shape[1] * (steps - WARMUP)
    return tokens / (times[-1] - times[WARMUP - 1]), (times[WARMUP - 1], times[-1])


def run_raypt(cfg, steps: int, name: str) -> tuple[float, tuple[float, float]]:
    from raypt.driver import run_dir, train
    from raypt.metrics.sink import read_metrics

    cfg = config.from_dict({**config.to_dict(cfg), "run": {**config.to_dict(cfg)["run"], "name": name}})
    train(cfg)
    records = {r["step"]: r for r in read_metrics(run_dir(cfg)) if r.get("loss") is not None}
    tokens = records[steps]["tokens_seen"] - records[WARMUP]["tokens_seen"]
    window = (records[WARMUP]["time"], records[steps]["time"])
    return tokens / (window[1] - window[0]), window


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import ray

    storage = tempfile.mkdtemp(prefix="raypt-bench-")
    overrides = [f"train.steps={args.steps}", f"train.eval_every={args.steps}", f"checkpoint.every={args.steps}",
                 f"run.storage={storage}", "scaling.cpus_per_worker=1", *args.overrides]
    cfg = config.load(JOB, overrides, check_data=False)
    if not os.path.exists(os.path.join(cfg.data.path, "manifest.json")):
        from raypt.data.prepare import prepare

        prepare(cfg.data.path, cfg.data.prepare)
    meter, figures, tokens, cores = CpuMeter(), {}, {}, {}
    for w in args.workers:
        sized = config.from_dict({**config.to_dict(cfg), "scaling": {**config.to_dict(cfg)["scaling"], "workers": w}})
        runs: dict[str, list] = {"bare": [], "bare_same_allocator": [], "raypt": []}
        for i in range(args.rounds):
            runs["bare"].append(run_bare(sized, args.steps))
            runs["bare_same_allocator"].append(run_bare(sized, args.steps, same_allocator=True))
            runs["raypt"].append(run_raypt(sized, args.steps, f"overhead-{w}-{i}"))
            ray.shutdown()  # the bare loop runs with no Ray cluster
            print(f"{w} rank(s), round {i}: " + ", ".join(f"{k} {v[-1][0]:.0f} tokens/s" for k, v in runs.items()))
        tokens[w] = {k: [rate for rate, _ in v] for k, v in runs.items()}
        cores[w] = {k: [meter.split(*window, ranks=w) for _, window in v] for k, v in runs.items()}
        median = {k: float(np.median(v)) for k, v in tokens[w].items()}
        # Medians of alternating rounds: robust to a noisy neighbour in any one round.
        figures.update({f"raypt_vs_bare_tokens_per_s_{w}rank": median["raypt"] / median["bare"],
                        f"raypt_vs_bare_same_allocator_{w}rank": median["raypt"] / median["bare_same_allocator"],
                        **{f"{k}_tokens_per_s_{w}rank": v for k, v in median.items()},
                        **{f"{k}_{part}_{w}rank": float(np.median([c[part] for c in cores[w][k]]))
                           for k in ("bare", "raypt") for part in ("rank_cores", "other_cores")}})
    meter.stop()
    figures.update({"rounds": args.rounds, "steps_timed": args.steps - WARMUP, "threads_per_rank": 1,
                    "zero_stage": cfg.deepspeed.zero_stage, "device": accelerator()})
    write_result("overhead", figures, per_round={"tokens_per_s": tokens, "cores": cores})


if __name__ == "__main__":
    main()
