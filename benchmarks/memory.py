"""Memory and checkpoint traffic per rank at 1, 2 and 4 ranks: a ZeRO-3 model whose state (fp32 parameters and
both Adam moments) is over 1 GB, built partitioned, saved and loaded, each rank measured from its baseline after the
imports. Figures are over the state's bytes, so a rank's share is 1 / world.

Build and save run in one group of processes, load in a fresh one (freed memory a process keeps would hide the
next phase's). Bytes written: the rank's checkpoint file. Bytes read (`Reader.bytes_read`): what the rank fetched
to verify its share of the files and to restore its slices; on local disk the restore reads again what verify read
(from the page cache), on S3 verify keeps its share on local disk and the restore reads it there, so the S3 traffic
is the verify share alone (`restore_read_bytes`: the restore's own reads). Resident after build: what DeepSpeed's
ZeRO-3 keeps per parameter, the fp32 masters and moments (12 bytes) plus the working copy and the gradient
partition (8 bytes in fp32, 4 in bf16), over the world size. No training: Adam's moments are created as a restore
creates them, and saved as the zeros they are before the first step.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile

import torch

from common import write_result

MODEL = {"task": "clm", "hidden_size": 1024, "num_layers": 6, "num_heads": 16}
TEXT = {"vocab_size": 16384, "seq_len": 16, "eos_id": 0}
WORLDS = (1, 2, 4)
PRECISIONS = ("fp32", "bf16")  # this machine's default, and the GPUs' (`auto`), whose working copy is half
FIGURES = (("build", "build_peak_rss"), ("resident", "resident_after_build_rss"), ("save", "save_peak_rss"),
           ("load", "load_peak_rss"), ("written", "written_bytes"), ("read", "read_bytes"),
           ("restored_read", "restore_read_bytes"))


def job(precision: str = "fp32"):
    from raypt.config import JobConfig

    return JobConfig.model_validate({"model": MODEL, "train": {"global_batch": 4, "micro_batch": 1},
                                     "deepspeed": {"zero_stage": 3, "precision": precision},
                                     "scaling": {"workers": 1}})


def phase(rank: int, world: int, port: int, folder: str, load: bool, precision: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import torch.distributed as dist

    from raypt.checkpoint import TrainState, newest_verified, save_checkpoint
    from raypt.engines import Topology, select
    from raypt.engines.device import keep_host_memory
    from raypt.metrics.memory import HostPeak, rss
    from raypt.tasks import get_task

    keep_host_memory(training=False)  # as the worker loop builds and restores
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg, topology = job(precision), Topology.data_parallel(world, rank)
    task = get_task("clm")(cfg, {"text": TEXT})
    small = cfg.model_copy(update={"model": cfg.model.model_copy(update={"hidden_size": 32, "num_layers": 1})})
    select(cfg).build(task.build_model(0, select(cfg).partition(small, topology)), small, topology)  # code paths
    dist.barrier()
    baseline, out = rss(), {}
    if load:
        with HostPeak(baseline) as peak, newest_verified(folder, None, lambda m: None) as reader:
            model = task.build_model(cfg.run.seed, select(cfg).partition(cfg, topology))
            engine = select(cfg).build(model, cfg, topology, reader)
            out = {"load": peak, "read": reader.bytes_read, "restored_read": reader.bytes_read - reader.checked}
        out["load"] = out["load"].above
        assert engine.optimizer_steps() == 0
    else:
        with HostPeak(baseline) as built:
            model = task.build_model(cfg.run.seed, select(cfg).partition(cfg, topology))
            engine = select(cfg).build(model, cfg, topology)
            engine._adam_state(0)  # the moments a restore creates, so that save writes what a trained run holds
        resident = rss() - baseline
        keep_host_memory()  # a run saves while training
        with HostPeak(baseline) as saved:
            save_checkpoint(engine, os.path.join(folder, "step000001"), TrainState(step=1, world_size=world), {},
                            cfg.model_dump(mode="json"), cfg.trajectory())
        name = f"state-{rank:05d}-of-{world:05d}.safetensors"
        out = {"build": built.above, "resident": resident, "save": saved.above,
               "written": os.path.getsize(os.path.join(folder, "step000001", name))}
    with open(os.path.join(folder, f"{'load' if load else 'save'}-{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    os._exit(0)  # as the gloo test tier: no interpreter teardown with gloo's threads still running


def group(world: int, folder: str, load: bool, precision: str) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(phase, args=(world, port, folder, load, precision), nprocs=world, join=True)
    return [json.load(open(os.path.join(folder, f"{'load' if load else 'save'}-{r}.json"))) for r in range(world)]


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    with torch.device("meta"):
        from raypt.tasks import get_task

        parameters = sum(p.numel() for p in get_task("clm")(job(), {"text": TEXT}).construct().parameters())
    state = 12 * parameters  # fp32 parameters and two moments
    figures: dict = {"parameters": parameters, "state_bytes": state}
    for precision in PRECISIONS:
        tag = "" if precision == "fp32" else f"_{precision}"
        for world in WORLDS:
            with tempfile.TemporaryDirectory(prefix="raypt-memory-") as folder:
                ranks = [{**a, **b} for a, b in zip(group(world, folder, False, precision),
                                                    group(world, folder, True, precision))]
            for key, name in FIGURES:
                figures[f"{name}_per_rank_vs_state_bytes{tag}_w{world}"] = round(max(r[key] for r in ranks) / state, 4)
            print(precision, world, {k: v for k, v in figures.items() if k.endswith(f"{tag}_w{world}")}, flush=True)
    write_result("memory", figures, model=MODEL, vocab_size=TEXT["vocab_size"], zero_stage=3, worlds=list(WORLDS),
                 precisions=list(PRECISIONS),
                 target={"load_peak_rss_per_rank_vs_state_bytes_w4": "<= 0.35",
                         "written_bytes_per_rank_vs_state_bytes_wN": "about 1 / N",
                         "read_bytes_per_rank_vs_state_bytes_wN": "about 1 / N"})


if __name__ == "__main__":
    main()
