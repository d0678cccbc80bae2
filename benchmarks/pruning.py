"""What gradual magnitude pruning costs a step: masks re-applied after every optimizer step, and one pruning event.

Two ranks (no Ray; gloo on CPU, NCCL on GPUs) train the quickstart model under ZeRO-2 on synthetic batches of its
shape. After pruning it to 80% sparsity, the same engine alternates blocks of plain steps and of steps followed by
the pruning hook's `apply` (the pruned entries of the fp32 masters, both Adam moments and the working copy set to
zero), so both see the same machine at the same moment; `pruning_step_overhead` is the median over rounds of the
ratio of their mean step times (target <= 1.05). `pruning_event_vs_step` is one pruning event (the distributed
threshold search that drops 5% of the kept weights, then `apply`) over a plain step's time, the median of EVENTS.
Usage: python benchmarks/pruning.py [--rounds 7] [--steps 8] [overrides...]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import write_result  # noqa: E402

JOB = os.path.join(os.path.dirname(__file__), "..", "jobs", "quickstart.yaml")
TEXT = {"vocab_size": 2048, "seq_len": 128, "eos_id": 0}  # the quickstart's prepared data, synthetic here
EVENTS = 5


def batches(cfg, engine, step: int):
    """This rank's micro-batches of a global batch of random tokens, cut as raypt's stream cuts them."""
    from raypt.data.split import Split

    split = Split(cfg.train.global_batch, engine.dp_size, cfg.train.micro_batch)
    start, count = split.share(engine.dp_rank)
    rows = torch.randint(0, TEXT["vocab_size"], (cfg.train.global_batch, TEXT["seq_len"]),
                         generator=torch.Generator().manual_seed(step))[start:start + count]
    return iter({"input_ids": rows[cut], "weight": weight} for cut, weight in split.micro_slices(engine.dp_rank))


def sync() -> None:
    """Wait for queued GPU work, so a timer sees it (nothing to wait for on a CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    began = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - began


def measure(rank: int, world: int, port: int, out: str, overrides: list[str], rounds: int, steps: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import torch.distributed as dist

    from raypt import config
    from raypt.engines import Topology, select
    from raypt.hooks.pruning import Pruning
    from raypt.tasks import get_task

    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    cfg = config.load(JOB, ["sparsity.final=0.8", *overrides], check_data=False)
    task = get_task(cfg.model.task)(cfg, {"text": TEXT})
    engine = select(cfg).build(task.build_model(cfg.run.seed), cfg, Topology.data_parallel(world, rank), None)
    hook = Pruning(cfg.sparsity)
    hook.start(SimpleNamespace(engine=engine), None)  # the hook reads only the loop's engine when it starts
    n = iter(range(10**9))

    def train(masks: bool) -> None:
        for _ in range(steps):
            engine.train_step(batches(cfg, engine, next(n)), task.loss)
            if masks:
                hook.apply(engine)
        sync()

    def event() -> None:
        hook.prune(engine, torch.tensor([hook.kept // 20]))
        sync()

    hook.prune(engine, torch.tensor([hook.size - int(0.2 * hook.size)]))  # to the final 80% sparsity
    train(True)  # warm-up
    plain, masked = [], []
    for r in range(rounds):  # alternating, in both orders
        first, second = (plain, masked) if r % 2 == 0 else (masked, plain)
        first.append(timed(lambda: train(first is masked)) / steps)
        second.append(timed(lambda: train(second is masked)) / steps)
    events = [timed(event) for _ in range(EVENTS)]
    if rank == 0:
        step = statistics.median(plain)
        with open(out, "w") as f:
            json.dump({"pruning_step_overhead": statistics.median(m / p for m, p in zip(masked, plain)),
                       "pruning_event_vs_step": statistics.median(events) / step, "step_s": step,
                       "event_s": statistics.median(events), "prunable_weights": hook.size,
                       "density": hook.kept / hook.size, "rounds": rounds, "steps_per_block": steps}, f)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # as the gloo test tier: no interpreter teardown with gloo's threads still running


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block")
    ap.add_argument("overrides", nargs="*", help="job overrides, e.g. deepspeed.zero_stage=3")
    args = ap.parse_args()
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "pruning.json")
        mp.spawn(measure, args=(2, port, out, args.overrides, args.rounds, args.steps), nprocs=2, join=True)
        figures = json.load(open(out))
    write_result("pruning", figures, job="jobs/quickstart.yaml", overrides=args.overrides, world_size=2,
                 target={"pruning_step_overhead": "<= 1.05"})


if __name__ == "__main__":
    main()
