"""DeepSpeed's pipeline engine (stages x data parallel) as an engine, ZeRO 0 or 1 within each stage's data-parallel
group.

Layout: rank = stage x dp_size + dp_rank (DeepSpeed's `PipeDataParallelTopology`). Each stage builds only its own
layers of the task's pipeline form (`Task.pipeline_layers`), each initialised by its name in the whole model
(raypt.models.init), so a pipeline run starts from the weights a ZeRO run of the same seed starts from. Its
parameters keep the whole model's names in checkpoints, so a run of any engine, stage count and data-parallel size
resumes them. A tied embedding lives on the first and the last stage; the first writes it.

A step is DeepSpeed's `train_batch`: `pipeline.micro_batches` micro-batches through its 1F1B schedule. Activations
between stages have one shape, so every micro-batch is padded to the split's `micro` rows (`Split.fixed`), and its
loss is a sum of row losses weighted so that the update is the one of the mean over the global batch, as on the
ZeRO path (raypt/data/split.py): a micro-batch of weight w and n real rows puts w / n on each, 0 on padding.
"""
from __future__ import annotations

import time
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn

from raypt.checkpoint.init import model_shapes
from raypt.config import JobConfig
from raypt.data.split import Split
from raypt.engines.base import Batch, LossFn, Shard, Topology
from raypt.engines.zero import ZeroEngine, load_ops
from raypt.metrics import Metric


def _weighted(task: Any, outputs: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The last stage's loss of a micro-batch: its rows' losses, each by its weight."""
    ids, weights = labels
    return (task.row_losses(outputs, {"input_ids": ids}) * weights).sum()


def _layers(pipe: nn.Module) -> Iterator[nn.Module]:
    """The layers this stage built (a tied one once), each knowing its `prefix` in the whole model and the parts
    to initialise there (raypt.models.llama_pipe.Layer)."""
    yield from pipe.tied_modules.values()
    yield from (m for n, m in pipe.named_children() if n != "tied_modules")


def _recompute(cfg: JobConfig) -> dict:
    """`fast.activation_checkpointing` on a pipeline: DeepSpeed recomputes each block (interval 1; the embedding,
    norm and head keep their activations), with torch's non-reentrant checkpoint as on the ZeRO path."""
    if not cfg.fast.activation_checkpointing:
        return {}
    from torch.utils.checkpoint import checkpoint

    from raypt.models.recompute import NON_REENTRANT

    return {"activation_checkpoint_interval": 1, "checkpointable_layers": ["Block"],
            "activation_checkpoint_func": partial(checkpoint, **NON_REENTRANT)}


class PipelineEngine(ZeroEngine):
    name = "pipeline"

    @classmethod
    def place(cls, cfg: JobConfig, world: int, rank: int) -> Topology:
        stages = cfg.pipeline.stages
        dp = world // stages
        return Topology(world, rank, dp, rank % dp, rank // dp, stages)

    @classmethod
    def split_for(cls, cfg: JobConfig, topology: Topology) -> Split:
        return Split.fixed(cfg.train.global_batch, topology.dp_size, cfg.pipeline.micro_batches)

    @classmethod
    def construct(cls, task: Any, cfg: JobConfig, topology: Topology) -> nn.Module:
        """This stage's layers in a `PipelineModule`, initialised by name. The whole model is made on the meta
        device only, for its sizes, its initialisation rule and its parameter shapes (what a checkpoint holds)."""
        load_ops(cfg)
        import deepspeed
        import torch.distributed as dist
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        from raypt.models.init import constructing, init_by_name

        with torch.device("meta"), constructing():
            whole = task.construct()
        # DeepSpeed's own view of the process group that Ray Train (or the caller) started: the module's topology
        # makes its groups before `deepspeed.initialize` would
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        torch.manual_seed(cfg.run.seed)

        class Pipe(PipelineModule):
            def _count_layer_params(self) -> list[int]:  # partition: parameters; sizes, not every layer built
                with torch.device("meta"):
                    return super()._count_layer_params()

        pipe = Pipe(layers=task.pipeline_layers(), loss_fn=partial(_weighted, task),
                    topology=PipeDataParallelTopology(num_pp=topology.stages, num_dp=topology.dp_size),
                    partition_method=cfg.pipeline.partition, **_recompute(cfg))
        for layer in _layers(pipe):
            for part, prefix in layer.init_parts():
                init_by_name(part, cfg.run.seed, prefix=prefix, owner=whole)
        pipe.config, pipe.whole_shapes = whole.config, model_shapes(whole)  # for FLOPs and restores
        if cfg.fast.compile:
            from raypt.models.compiled import compile_blocks

            compile_blocks(pipe)
        return pipe

    @classmethod
    def build(cls, model: nn.Module, cfg: JobConfig, topology: Topology, restore=None) -> "PipelineEngine":
        engine = super().build(model, cfg, topology, restore)
        engine.metrics = (*(Metric(f"stage{k}_s", "max", f"seconds stage {k} took for the step's schedule")
                            for k in range(topology.stages)),
                          Metric("bubble_fraction", "mean", "share of a stage's schedule (gradient reduction and "
                                 "update left out) not spent in its forward and backward passes, over the stages"))
        engine._instructions()
        return engine

    def _instructions(self) -> None:
        """DeepSpeed runs each instruction of its schedule from a class-level table. This engine's own table runs
        the update through the update gate (the loss is known on the last stage by then; the other stages say
        finite) and times the passes, the gradient reductions and the update for the bubble it measures."""
        from deepspeed.runtime.pipe import schedule as s

        table = dict(type(self.ds)._INSTRUCTION_MAP)
        update = table[s.OptimizerStep]

        def gated(ds: Any, lr_kwargs: Any = None) -> None:
            finite = torch.isfinite(ds.total_loss) if ds.is_last_stage() else torch.ones((), dtype=torch.bool)
            self._update(finite, lambda: update(ds, lr_kwargs))

        def timed(kind: str, run: Callable) -> Callable:
            def instruction(ds: Any, **kwargs: Any) -> None:
                t = time.perf_counter()
                run(ds, **kwargs)
                if self.device.type == "cuda":  # the kernels, not their launch
                    torch.cuda.synchronize(self.device)
                self.spent[kind] += time.perf_counter() - t
            return instruction

        self.spent = {"passes": 0.0, "update": 0.0}  # this step's so far (evaluations add theirs, reset at a step)
        table[s.OptimizerStep] = gated
        for kind, instructions in (("passes", (s.ForwardPass, s.BackwardPass)),
                                   ("update", (s.OptimizerStep, s.ReduceGrads, s.ReduceTiedGrads))):
            for instruction in instructions:
                table[instruction] = timed(kind, table[instruction])
        self.ds._INSTRUCTION_MAP = table

    def _micro(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(first stage's input, last stage's labels and row weights) of one micro-batch, padded to `micro` rows."""
        weight, ids = batch["weight"], batch["input_ids"]
        n, pad = len(ids), self.split.micro - len(ids)
        rows = torch.cat([torch.full((n,), weight / n), torch.zeros(pad)])
        ids = torch.cat([ids, ids[:1].expand(pad, -1)])
        if self.pinned:  # DeepSpeed's own copy of a tensor already on the device is none
            ids, rows = self.local_to_device({"ids": ids, "rows": rows}).values()
        return ids, (ids, rows)

    def train_step(self, batches: Iterator[Batch], loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        micro = [next(batches) for _ in range(self.micro_batches)]  # a middle stage's: blanks, unused
        self.spent = {"passes": 0.0, "update": 0.0}
        t = time.perf_counter()
        self.ds.train_batch(data_iter=iter([self._micro(b) for b in micro]) if self.consumes_data else None)
        took = time.perf_counter() - t
        stages = {f"stage{k}_s": took if k == self.topology.stage else 0.0 for k in range(self.topology.stages)}
        bubble = 1 - self.spent["passes"] / max(took - self.spent["update"], 1e-9)
        return self.ds.dp_group_loss, {**stages, "bubble_fraction": bubble}  # the loss: this replica's

    def eval_step(self, batch: Batch, loss_fn: LossFn) -> tuple[torch.Tensor, dict]:
        """The mean loss over the batch's rows (this replica's), on every stage."""
        import torch.distributed as dist

        data = [self._micro({**batch, "weight": 1.0})] if self.consumes_data else []
        out = self.ds.eval_batch(iter(data), num_micro_batches=1, reduce_output=None, bcast_loss=False)
        loss = out[0].detach().float().reshape(1) if self.ds.is_last_stage() else torch.zeros(1, device=self.device)
        dist.broadcast(loss, src=self.ds._loss_stage_global_rank(), group=self.ds.grid.get_pipe_parallel_group())
        return loss[0], {}

    @property
    def consumes_data(self) -> bool:
        """The first stage takes the tokens, the last the labels; the stages between only activations."""
        return self.topology.stage in (0, self.topology.stages - 1)

    @property
    def readers(self) -> int:
        return 2

    @property
    def dp_group(self) -> Any:
        return self.ds.grid.get_data_parallel_group()

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for layer in _layers(self.ds.module):
            for name, param in layer.named_parameters():
                yield f"{layer.prefix}.{name}" if layer.prefix else name, param

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.ds.module.whole_shapes

    def shards(self) -> Iterator[Shard]:
        """ZeRO's, by the whole model's names; a tied embedding's copy on a later stage is marked as one."""
        pipe = self.ds.module
        copies = set() if self.topology.stage == 0 else {
            f"{m.prefix}.{n}" for m in pipe.tied_modules.values() for n, _ in m.named_parameters()}
        for shard in super().shards():
            yield replace(shard, copy=True) if shard.name in copies else shard
