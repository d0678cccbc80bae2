"""Gradual magnitude pruning as a loop hook (algorithms.md B): prune before the steps the schedule says, keep the
pruned entries of the fp32 masters, both Adam moments and the working copy at zero after every optimizer step, and
report density, non-zero parameters and their token-weighted mean N_avg (a dense run reports its constant count).

Masks are full boolean tensors by parameter name on every rank (the replicated working copy of ZeRO 0-2 needs all
of each), so the checkpoint holds them whatever the world size. Pruning after the step, rather than masking the
forward, leaves the pruned weights' gradients in the clipping norm: they are zeroed, never applied."""
from __future__ import annotations

import math
from itertools import accumulate
from typing import Any, Optional

import torch
import torch.distributed as dist

from raypt.hooks.base import Hook
from raypt.metrics import Metric
from raypt.sparsity.config import SparsityConfig
from raypt.sparsity.plan import RunningMean, due, read_at, target_keep
from raypt.sparsity.select import prunable
from raypt.sparsity.threshold import Slice, choose, magnitude_bits


class Pruning(Hook):
    name = "sparsity"
    metrics = (
        Metric("density", "rank0", "share of the prunable weights not pruned (1 in a dense run)"),
        Metric("nonzero_params", "rank0", "N_t: parameters not pruned in the step (all of them in a dense run)"),
        Metric("n_avg", "rank0", "token-weighted mean of nonzero_params over the run so far (Jin et al. 2025)"),
    )

    def __init__(self, cfg: SparsityConfig):
        self.cfg = cfg
        self.masks: dict[str, torch.Tensor] = {}  # flat, by parameter name: True = kept
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.saved: dict[str, torch.Tensor] = {}
        self.mean = RunningMean()
        self.total = self.kept = self.size = 0

    def restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.saved, self.mean = tensors, RunningMean(**state["mean"])

    def start(self, loop: Any, reader: Optional[Any]) -> None:
        engine = loop.engine
        model = getattr(engine.module, "module", engine.module)  # DeepSpeed's engine wraps the model
        self.total = sum(math.prod(getattr(p, "ds_shape", None) or p.shape) for p in model.parameters())
        if self.cfg.final == 0:
            return
        names = set(prunable(model, self.cfg))
        for shard in engine.shards():
            if shard.name in names:
                saved = self.saved.get(shard.name)
                mask = saved.flatten() if saved is not None else torch.ones(shard.numel, dtype=torch.bool)
                self.masks[shard.name], self.shapes[shard.name] = mask.to(engine.device), shard.shape
        self.size = sum(m.numel() for m in self.masks.values())
        self.kept = sum(int(m.sum()) for m in self.masks.values())
        self.apply(engine)

    def before_step(self, loop: Any, step: int) -> None:
        steps = loop.cfg.train.steps
        total = loop.plan.tokens_before(steps)
        tokens = read_at(step, steps, loop.plan.tokens_before(step - 1), total)
        if not due(self.cfg, step, tokens, total):
            return
        if self.cfg.scope == "global":
            need = torch.tensor([self.kept - target_keep(self.cfg, self.size, tokens, total)])
        else:
            need = torch.tensor([int(m.sum()) - target_keep(self.cfg, m.numel(), tokens, total)
                                 for m in self.masks.values()])
        if int(need.clamp(min=0).sum()) > 0:
            self.prune(loop.engine, need.clamp(min=0))

    def prune(self, engine: Any, need: torch.Tensor) -> None:
        """Drop `need` weights per group (the whole prunable set, or each tensor), found across the ranks."""
        group = {n: 0 if self.cfg.scope == "global" else i for i, n in enumerate(self.masks)}
        shards = [s for s in engine.shards() if s.name in self.masks]
        slices = [Slice(s.name, group[s.name], s.start,
                        magnitude_bits(s.master, self.local(s.name, s.start, s.master))) for s in shards]
        sharded = engine.shards_masters and dist.is_initialized() and dist.get_world_size(engine.dp_group) > 1

        def reduce(t: torch.Tensor) -> torch.Tensor:
            if not sharded:
                return t
            t = t.to(engine.device)
            dist.all_reduce(t, group=engine.dp_group)
            return t.cpu()

        rank, world = (engine.dp_rank, engine.dp_size) if sharded else (0, 1)
        chosen = choose(slices, need.to(torch.int64), reduce, rank, world)
        offsets = dict(zip(self.masks, accumulate((m.numel() for m in self.masks.values()), initial=0)))
        gone = torch.zeros(self.size, dtype=torch.uint8, device=engine.device)  # this event's, over every rank
        for s, pruned in zip(shards, chosen):
            at = offsets[s.name] + s.start
            gone[at:at + len(pruned)] = pruned.to(engine.device, torch.uint8)
        if sharded:
            dist.all_reduce(gone, group=engine.dp_group)
        for name, mask in self.masks.items():
            at = offsets[name]
            mask &= gone[at:at + mask.numel()] == 0
        self.kept = sum(int(m.sum()) for m in self.masks.values())
        self.apply(engine)

    def local(self, name: str, start: int, tensor: torch.Tensor) -> torch.Tensor:
        """The mask over a shard's view that begins at full flat index `start`, on the view's device."""
        return self.masks[name][start:start + tensor.numel()].to(tensor.device)

    def apply(self, engine: Any) -> None:
        """Zero the pruned entries of the masters, Adam's moments and the working copy."""
        with torch.no_grad():
            for s in engine.shards():
                if s.name not in self.masks:
                    continue
                for view in (s.master, *s.moments):
                    view.masked_fill_(~self.local(s.name, s.start, view), 0)
                for view, start in s.working:
                    view.masked_fill_(~self.local(s.name, start, view), 0)

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if self.masks:
            self.apply(loop.engine)
        nonzero = self.total - self.size + self.kept
        self.mean.add(nonzero, loop.plan.tokens_before(step) - loop.plan.tokens_before(step - 1))
        record.update(density=self.kept / self.size if self.size else 1.0, nonzero_params=nonzero,
                      n_avg=self.mean.value)

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        masks = {n: m.reshape(self.shapes[n]).cpu() for n, m in self.masks.items()}
        return masks, {"mean": self.mean.state()}


def sparsity_by_tensor(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Each pruned tensor's share of zeros, from the masks a checkpoint holds."""
    return {name: int((~mask).sum()) / mask.numel() for name, mask in sorted(masks.items())}
