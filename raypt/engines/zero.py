"""DeepSpeed ZeRO 0-3 (with optional CPU offload) as an engine: every rank is a data-parallel peer."""
from __future__ import annotations

import fcntl
import logging
import math
import os
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

from raypt.checkpoint.index import MOMENTS, PARAM
from raypt.checkpoint.init import check_shapes, model_shapes
from raypt.config import JobConfig
from raypt.data.split import Split
from raypt.engines.base import Batch, Engine, LossFn, Shard, Topology
from raypt.engines.device import accelerator, precision

if TYPE_CHECKING:
    from raypt.models.init import Partition

log = logging.getLogger(__name__)


def ds_config(cfg: JobConfig, split: Split) -> dict:
    """`split`: the engine's (its weights keep the global batch exact at any data-parallel size)."""
    prec = precision(cfg.deepspeed.precision)
    zero: dict = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": accelerator() == "cuda"}
        if cfg.deepspeed.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": accelerator() == "cuda"}
    conf = {
        "train_batch_size": split.nominal_batch,
        "train_micro_batch_size_per_gpu": split.micro,
        "gradient_accumulation_steps": split.accumulation,
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
    """No decay on norms and biases (1-D tensors), as in GPT/Llama recipes; by the full shape (ZeRO-3 keeps it
    aside: a partitioned parameter's own tensor is a flat slice)."""
    def matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", None) or p.shape) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not matrix(p)]
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


def share_fp32_masters() -> None:
    """ZeRO-3 in fp32: let each fp32 master partition be the working partition itself, as DeepSpeed means to
    (stage3 `_create_fp32_partitions`). Its test compares the partition's torch.device with a device name, which
    are never equal, so it clones them: 4 bytes per parameter over the world for nothing, allocated during the
    build. While the partitions are created, the optimizer's device is given as a torch.device. Offloaded
    optimizers keep their own (their branch comes first and compares nothing). Idempotent."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    create = Stage3._create_fp32_partitions
    if getattr(create, "raypt_shares", False):
        return

    def create_sharing(self: Any) -> None:
        named = self.device
        if not self.offload_optimizer:
            self.device = torch.device(named)
        try:
            create(self)
        finally:
            self.device = named

    create_sharing.raypt_shares = True  # type: ignore[attr-defined]
    Stage3._create_fp32_partitions = create_sharing


class ZeroEngine(Engine):
    """`deepspeed.initialize` with ZeRO stage 0-3. Offload needs DeepSpeed's CPU Adam; otherwise torch's AdamW
    (fused on CUDA) skips a JIT build."""

    name = "zero"
    _finite: Optional[torch.Tensor] = None  # whether every micro-batch loss of this step so far was finite

    def __init__(self, ds, topology: Topology, split: Split):
        self.ds, self.topology, self.split, self.micro_batches = ds, topology, split, split.accumulation
        self.device, self.module = ds.device, ds  # the loss runs through the engine, so ZeRO-3 hooks see it

    @classmethod
    def split_for(cls, cfg: JobConfig, topology: Topology) -> Split:
        return Split(cfg.train.global_batch, topology.dp_size, cfg.train.micro_batch)

    @classmethod
    def partition(cls, cfg: JobConfig, topology: Topology) -> Optional["Partition"]:
        """ZeRO-3: each module's parameters are partitioned as it is constructed (`deepspeed.zero.Init`) and
        initialised gathered a few at a time, rank 0's values kept (every rank computes the same ones)."""
        if cfg.deepspeed.zero_stage != 3:
            return None
        load_ops(cfg)
        import deepspeed

        from raypt.models.init import Partition  # torch's dispatch machinery: imported only to build

        full = ds_config(cfg, cls.split_for(cfg, topology))  # its batch sizes are checked only at initialize
        conf = {k: full[k] for k in ("zero_optimization", "bf16", "fp16", "train_micro_batch_size_per_gpu")}
        return Partition(lambda: deepspeed.zero.Init(config_dict_or_path=conf),
                         lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))

    @classmethod
    def build(cls, model: torch.nn.Module, cfg: JobConfig, topology: Topology, restore=None) -> "ZeroEngine":
        load_ops(cfg)
        share_fp32_masters()
        import deepspeed

        split = cls.split_for(cfg, topology)
        conf = ds_config(cfg, split)
        groups = param_groups(model, cfg.train.weight_decay)
        optimizer, fused = None, cfg.fast.fused_optimizer
        if "optimizer" not in conf:
            args = optimizer_args(cfg)
            optimizer = torch.optim.AdamW(groups, lr=args["lr"], betas=tuple(args["betas"]), eps=args["eps"],
                                          fused=accelerator() == "cuda" if fused is None else fused)
        ds, *_ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=conf,
                                      dist_init_required=False)
        engine = cls(ds, topology, split)
        if cfg.fast.pin_memory and ds.device.type != "cuda":
            raise ValueError(f"fast.pin_memory: true needs a CUDA device; this rank runs on {ds.device.type}")
        engine.pinned = cfg.fast.pin_memory
        if restore is not None:
            engine._load(restore)
        return engine

    def train_step(self, batches: Iterator[Batch], loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        loss_sum, sums = torch.zeros((), device=self.device), {}
        for _ in range(self.micro_batches):
            batch = next(batches)
            weight = batch.pop("weight")  # rows-weighted: the step's mean over the global batch (data/split.py)
            loss, metrics = loss_fn(self.ds, self.local_to_device(batch))
            self.ds.backward(loss * weight)
            self._step(loss)
            loss_sum += loss.detach() * weight  # summed on the device: no host sync per micro-batch on a GPU
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach() * weight
        return loss_sum / self.micro_batches, {k: v / self.micro_batches for k, v in sums.items()}

    def _step(self, loss: torch.Tensor) -> None:
        """DeepSpeed's step after a micro-batch's backward. At the accumulation boundary `update_gate` (when set)
        sees whether each micro-batch loss of this rank's step was finite and may veto the update: DeepSpeed's
        step then runs as on every other rank (gradients reduced and zeroed), but the optimizer under it leaves
        the weights and Adam's state, step counter included, as they were."""
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        if not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()
            return
        finite, self._finite = self._finite, None
        self._update(finite, self.ds.step)

    def _update(self, finite: torch.Tensor, step: Callable[[], None]) -> None:
        """DeepSpeed's update `step`, unless `update_gate` vetoes it: then it runs (gradients reduced and
        zeroed, as on every other rank) with the optimizer under it leaving the weights and Adam's state as they
        were."""
        if self.update_gate is None or self.update_gate(finite):
            step()
            return
        base = self._base()
        base.step = lambda *args, **kwargs: None  # shadows the class's step for this one update
        try:
            step()
        finally:
            del base.step

    def eval_step(self, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        self.ds.eval()
        with torch.no_grad():
            loss, metrics = loss_fn(self.ds, self.local_to_device(batch))
        self.ds.train()
        return loss, metrics

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    # --- state as full tensors by parameter name ------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """This rank's parameters by the names a checkpoint gives them (the task's model's own)."""
        return self.ds.module.named_parameters()

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shapes of every parameter of the whole model, by name, that a checkpoint must hold."""
        return model_shapes(self.ds.module)

    def _base(self) -> torch.optim.Optimizer:
        opt = self.ds.optimizer
        return getattr(opt, "optimizer", opt)

    def _link(self) -> None:
        """(Re)link ZeRO-1/2 and bf16 fragments to Adam's state: DeepSpeed links once, after the first group's
        step, so later param groups (our no-decay group) and state we create on restore stay unlinked."""
        opt = self.ds.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def optimizer_steps(self) -> int:
        for s in self._base().state.values():
            if "step" in s:
                return int(s["step"])
        return 0

    def state_tensors(self) -> Iterator[tuple[str, int, Optional[torch.Tensor]]]:
        """Every rank joins the gathers (ZeRO-3 and ZeRO-1/2 fragments need them); parameter i is owned by
        rank i % world."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        base, world, rank = self._base(), self.topology.world, self.topology.rank
        self._link()
        for i, (name, param) in enumerate(self.named_parameters()):
            for kind in (PARAM, *MOMENTS) if param.requires_grad else (PARAM,):  # frozen: no Adam state
                value = safe_get_full_fp32_param(param) if kind == PARAM else \
                    safe_get_full_optimizer_state(param, kind)
                if value is None:  # ZeRO-0 in fp32: the optimizer works on the module's own tensors
                    value = param.data if kind == PARAM else base.state[param][kind]
                owner = i % world
                yield f"{kind}/{name}", owner, value.detach().float().cpu().contiguous() if owner == rank else None

    @property
    def shards_masters(self) -> bool:
        return any(hasattr(p, "ds_tensor") or hasattr(p, "_hp_mapping") for p in self.ds.module.parameters())

    def shards(self) -> Iterator[Shard]:
        """ZeRO-3: this rank's partition of the masters, moments and working copy (views into the flat fp32
        sub-groups, also where they are offloaded to the CPU); ZeRO-1/2 and bf16: this rank's fp32 fragment and
        its linked moments, with the whole replicated working copy; fp32 ZeRO-0: the module's own tensors."""
        opt, base = self.ds.optimizer, self._base()
        self._link()
        for name, param in self.named_parameters():
            if not param.requires_grad:  # no master, no moments: its working copy (this rank's slice in ZeRO-3)
                split = hasattr(param, "ds_tensor")
                flat = param.ds_tensor.data.view(-1) if split else param.data.view(-1)
                start = self.topology.dp_rank * flat.numel() if split else 0
                shape = tuple(param.ds_shape if split else param.shape)
                flat = flat[:max(0, min(flat.numel(), math.prod(shape) - start))]  # the last one is zero-padded
                working = ((flat, start),) + (((param.data.view(-1), 0),) if split and param.data.numel() ==
                                             param.ds_numel else ())  # ZeRO-3 keeps small ones gathered
                yield Shard(name, shape, start, flat, (), working, trainable=False, replicated=not split)
            elif hasattr(param, "ds_tensor"):
                size = param.ds_tensor.numel()
                start = self.topology.dp_rank * size
                valid = max(0, min(size, param.ds_numel - start))  # the last partition is zero-padded
                master, group = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
                held = opt.fp32_partitioned_groups_flat[group] in base.state
                moments = tuple(opt._get_fp32_opt_state_partition(param, False, kind)[0][:valid]
                                for kind in MOMENTS) if held else ()
                working = ((param.ds_tensor.data.view(-1)[:valid], start),)
                if param.data.numel() == param.ds_numel:  # also gathered: persistent (small) or in use
                    working += ((param.data.view(-1), 0),)
                yield Shard(name, tuple(param.ds_shape), start, master[:valid], moments, working)
            elif hasattr(param, "_hp_mapping"):
                mapping, working = param._hp_mapping, param.data.view(-1)
                if mapping is None:  # no fragment of this parameter in this rank's partition
                    yield Shard(name, tuple(param.shape), 0, working[:0], (), ((working, 0),))
                    continue
                fragments = mapping.optim_fragment or {}
                moments = tuple(fragments[kind] for kind in MOMENTS) if MOMENTS[0] in fragments else ()
                yield Shard(name, tuple(param.shape), mapping.lp_fragment_address.start, mapping.hp_fragment,
                            moments, ((working, 0),))
            else:
                if hasattr(opt, "refresh_fp32_params"):  # fp16 without ZeRO keeps its masters out of reach here
                    raise NotImplementedError("checkpoints and sparsity need ZeRO (deepspeed.zero_stage >= 1) with fp16")
                state, flat = base.state.get(param, {}), param.data.view(-1)
                moments = tuple(state[kind].view(-1) for kind in MOMENTS) if MOMENTS[0] in state else ()
                yield Shard(name, tuple(param.shape), 0, flat, moments, ((flat, 0),), replicated=True)

    def _adam_keys(self) -> list[torch.Tensor]:
        """The tensors Adam keys its state on: ZeRO's flat fp32 partitions, or the module's own parameters."""
        opt = self.ds.optimizer
        for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
            if hasattr(opt, attr):
                return list(getattr(opt, attr))
        return [p for g in self._base().param_groups for p in g["params"]]

    def _adam_state(self, step: int) -> None:
        """Adam creates its state lazily, at its first step; give it one to restore into."""
        base = self._base()
        fused = any(g.get("fused") for g in base.param_groups)
        for flat in self._adam_keys():
            if not base.state.get(flat):
                base.state[flat] = {
                    "step": torch.tensor(float(step), device=flat.device if fused else "cpu")
                    if isinstance(base, torch.optim.AdamW) else step,
                    "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}

    @torch.no_grad()
    def _load(self, restore) -> None:
        """The saved fp32 weights, and Adam's moments where the source holds them (run.init_from with optimizer:
        reset does not), straight into this rank's slices of the masters (`shards`): each rank reads only its
        share. Then the working copy (bf16 on GPUs) from the masters. Loaded into the model before
        `deepspeed.initialize`, they would pass through the working precision and the masters of a bf16 run would
        come back rounded."""
        check_shapes(self.model_shapes(), restore.param_shapes(), restore.origin)
        kinds = (PARAM, *MOMENTS) if restore.holds_optimizer else (PARAM,)
        if restore.holds_optimizer:
            self._adam_state(restore.optimizer_steps)
        for shard in self.shards():
            stop = shard.start + shard.master.numel()
            if not shard.trainable:  # no master to derive it from: every copy the forward reads
                for view, begin in shard.working:
                    restore.flat(f"{PARAM}/{shard.name}", begin, begin + view.numel(), out=view)
                continue
            targets = (shard.master, *shard.moments)[:len(kinds)]
            if stop == shard.start:
                continue
            if len(targets) != len(kinds):
                raise RuntimeError(f"{shard.name}: the engine exposes no Adam state to restore into")
            for kind, target in zip(kinds, targets):
                restore.flat(f"{kind}/{shard.name}", shard.start, stop, out=target)  # in place where it can
        opt = self.ds.optimizer
        if hasattr(opt, "update_lp_params"):  # ZeRO-1/2, bf16: the working copy from the masters
            opt.update_lp_params()
        elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: each sub-group's working partition
            for group in range(len(opt.fp32_partitioned_groups_flat)):
                opt._reassign_or_swap_out_partitioned_parameters(group)
