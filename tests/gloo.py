"""The gloo tier: engine strategies and checkpoints in a multi-process group that torch itself starts, no Ray.

`run_group(world, scenario, out_dir, **kwargs)` spawns `world` processes, each joining one gloo group and calling
`scenario(rank, world, out_dir, **kwargs)`; each rank writes what it saw to `out_dir/<scenario>-r<rank>.json`,
which the test reads back. A tiny Llama on synthetic tokens keeps each group to seconds.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Callable

import torch

VOCAB, SEQ, GLOBAL = 64, 16, 12  # 12 rows split over 1, 2, 3 or 4 ranks, one row per micro-batch
TEXT = {"vocab_size": VOCAB, "seq_len": SEQ, "eos_id": 0}


def job(stage: int, offload: str = "none", steps: int = 4, stages: int = 1, workers: int = 1,
        fast: dict | None = None, **model):
    """`stages` > 1: a pipeline of that many stages (4 micro-batches a step) over `workers` ranks; `fast`: the
    fast: section."""
    from raypt.config import JobConfig

    return JobConfig.model_validate({
        "model": {"task": "clm", "hidden_size": 32, "num_layers": 2, "num_heads": 2, **model},
        "train": {"steps": steps, "global_batch": GLOBAL, "micro_batch": 1, "lr": 3e-3},
        "deepspeed": {"zero_stage": stage, "offload": offload}, "scaling": {"workers": workers},
        "pipeline": {"stages": stages, "micro_batches": 4}, "fast": fast or {}})


def global_batch(step: int) -> torch.Tensor:
    """The rows of global step `step`: a pure function of the step, like raypt's data order (two batches in
    turn, so a few steps learn something)."""
    return torch.randint(0, VOCAB, (GLOBAL, SEQ), generator=torch.Generator().manual_seed(1000 + step % 2))


def rank_batches(step: int, split, dp_rank: int):
    """This rank's micro-batches of a step, in order, cut by the engine's split as raypt's data stream cuts them
    (unequal shares where the ranks do not divide the batch)."""
    start, count = split.share(dp_rank)
    rows = global_batch(step)[start:start + count]
    return iter({"input_ids": rows[cut], "weight": weight} for cut, weight in split.micro_slices(dp_rank))


FROZEN = "model.norm.weight"  # with build(frozen=True): a frozen parameter, as MAE's fixed position embeddings


def frozen_values(saved: bool) -> torch.Tensor:
    """The frozen parameter's values: its own in a trained run; zeros in a resumed build, so that only the
    restore can bring the saved ones back."""
    return torch.linspace(0.5, 1.5, 32) if saved else torch.zeros(32)


def build(cfg, world: int, rank: int, restore=None, frozen: bool = False):
    """The task and the engine the job selects, as the worker loop builds them (without ZeRO-3's partitioned
    construction: built in full, then partitioned)."""
    from raypt.engines import select
    from raypt.tasks import get_task

    task = get_task("clm")(cfg, {"text": TEXT})
    engine = select(cfg)
    topology = engine.place(cfg, world, rank)
    full = cfg.deepspeed.zero_stage == 3 and cfg.pipeline.stages == 1
    model = task.build_model(cfg.run.seed) if full else engine.construct(task, cfg, topology)
    if frozen:
        model.get_parameter(FROZEN).requires_grad_(False).data.copy_(frozen_values(saved=restore is None))
    return task, engine.build(model, cfg, topology, restore)


def train(task, engine, steps: range) -> list[float]:
    """Run the steps; each loss as the run reports it (the mean over ranks). A rank that reads no data (a
    pipeline's middle stage) gets blanks, as from raypt's stream."""
    from raypt.data.stream import Blank
    from raypt.metrics import CORE, Reducer

    reduce, losses = Reducer(CORE), []
    for step in steps:
        batches = (rank_batches(step, engine.split, engine.dp_rank) if engine.consumes_data
                   else Blank(engine.split, engine.dp_rank).batches(step, 1))
        loss, _ = engine.train_step(batches, task.loss)
        losses.append(reduce({"loss": loss})["loss"])
    return losses


def _entry(rank: int, world: int, port: int, scenario: Callable, out_dir: str, kwargs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = scenario(rank, world, out_dir, **kwargs)
    with open(os.path.join(out_dir, f"{scenario.__name__}-r{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    # The result is on disk: leave without the interpreter's teardown, where a library thread still running
    # (gloo's, DeepSpeed's) can end the process in std::terminate and fail a group that did its work.
    os._exit(0)


# Ranks fork from one server that imported these once (about 3 s per process on 2 cores otherwise). It has run
# no torch op and started no Python thread; its only threads are native idle helpers (torch's, pyarrow's
# jemalloc background thread), which a fork leaves behind as it does for torch's DataLoader workers.
PRELOAD = ["torch", "deepspeed", "deepspeed.pipe", "transformers.models.llama.modeling_llama", "raypt.engines",
           "raypt.tasks", "raypt.checkpoint"]


def run_group(world: int, scenario: Callable, out_dir: str, **kwargs) -> list:
    """Every rank's result, in rank order."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(PRELOAD)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unset = "DS_ACCELERATOR" not in os.environ
    os.environ["DS_ACCELERATOR"] = "cpu"  # for the server (started once) as it imports DeepSpeed; not for the tests
    try:
        mp.start_processes(_entry, args=(world, port, scenario, out_dir, kwargs), nprocs=world, join=True,
                           start_method="forkserver")
    finally:
        if unset:
            del os.environ["DS_ACCELERATOR"]
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"{scenario.__name__}-r{rank}.json")) as f:
            results.append(json.load(f))
    return results
