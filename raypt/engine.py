"""DeepSpeed engine from the job config: device and precision auto-detected, batch split from the world size."""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import sys

import torch

from raypt.config import JobConfig

log = logging.getLogger(__name__)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_host_memory() -> None:
    """Stop glibc handing each step's freed activations back to the kernel only to fault them in again on the
    next step. Ray Train runs the loop on a non-main thread, whose malloc arena grows in small mmapped heaps:
    on the quickstart's ranks this was 9-13k page faults per step, and 1.5k with these settings."""
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library: leave its defaults
        return
    for option, value in ((M_MMAP_THRESHOLD, 32 << 20), (M_TOP_PAD, 64 << 20), (M_TRIM_THRESHOLD, 512 << 20)):
        mallopt(option, value)


def accelerator() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision(requested: str) -> str:
    if requested != "auto":
        return requested
    if accelerator() == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def grad_accumulation(cfg: JobConfig, world: int) -> int:
    per_step = cfg.train.micro_batch * world
    if cfg.train.global_batch % per_step:
        raise ValueError(f"train.global_batch {cfg.train.global_batch} is not a multiple of micro_batch "
                         f"{cfg.train.micro_batch} x world size {world}")
    return cfg.train.global_batch // per_step


def ds_config(cfg: JobConfig, world: int) -> dict:
    prec = precision(cfg.deepspeed.precision)
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": accelerator() == "cuda"}
        if cfg.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": accelerator() == "cuda"}
    conf = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": grad_accumulation(cfg, world),
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "bf16": {"enabled": prec == "bf16"},
        "fp16": {"enabled": prec == "fp16", "initial_scale_power": 16},
    }
    if cfg.deepspeed.offload == "cpu":
        conf["optimizer"] = {"type": "AdamW", "params": optimizer_args(cfg)}
    return conf


def optimizer_args(cfg: JobConfig) -> dict:
    t = cfg.train
    return {"lr": t.lr, "betas": list(t.betas), "eps": t.eps, "weight_decay": t.weight_decay}


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No decay on norms and biases (1-D tensors), as in GPT/Llama recipes."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def load_ops(cfg: JobConfig) -> None:
    """Build DeepSpeed's JIT ops under a kernel lock: torch's build lock is a plain file that a worker killed
    mid-build (a resize, a preemption) leaves behind, and every later restart on that node would wait on it forever."""
    os.environ.setdefault("DS_ACCELERATOR", accelerator())
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory, get_default_build_root

    names = (["ShareMemCommBuilder"] if accelerator() == "cpu" else []) + (
        ["CPUAdamBuilder"] if cfg.deepspeed.offload == "cpu" else [])
    builders = [b for b in map(get_accelerator().create_op_builder, names) if b is not None and b.is_compatible(False)]
    if not builders:
        return
    os.makedirs(get_default_build_root(), exist_ok=True)
    with open(os.path.join(get_default_build_root(), "raypt-build.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the kernel drops it when its holder dies
        for builder in builders:
            stale = os.path.join(_get_build_directory(builder.name, False), "lock")
            if os.path.exists(stale):
                log.warning("removing %s, left by a process killed while building %s", stale, builder.name)
                os.remove(stale)
            builder.load(verbose=False)


def build_engine(model: torch.nn.Module, cfg: JobConfig, world: int):
    """Offload needs DeepSpeed's CPU Adam; otherwise torch's AdamW (fused on CUDA) skips a JIT build."""
    load_ops(cfg)
    import deepspeed

    conf = ds_config(cfg, world)
    groups = param_groups(model, cfg.train.weight_decay)
    optimizer = None
    if "optimizer" not in conf:
        args = optimizer_args(cfg)
        optimizer = torch.optim.AdamW(groups, lr=args["lr"], betas=tuple(args["betas"]), eps=args["eps"],
                                      fused=accelerator() == "cuda")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=conf,
                                      dist_init_required=False)
    return engine


def set_lr(engine, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
