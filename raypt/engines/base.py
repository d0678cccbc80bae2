"""The engine strategy: the one interface the worker loop talks to, whatever runs the model.

An engine owns how a step runs (ZeRO's per-micro-batch backward/step, a pipeline's whole-batch schedule), which
ranks are data-parallel peers, and how its sharded state maps to full tensors by parameter name. The loop never
says "world size" where it means data parallelism: it asks the engine for `dp_rank` / `dp_size`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Optional

from raypt.checkpoint.index import MOMENTS, PARAM  # noqa: F401  the kinds of state, as the checkpoint names them
from raypt.metrics import Metric

if TYPE_CHECKING:
    import torch

    from raypt.checkpoint import Reader
    from raypt.config import JobConfig
    from raypt.data.split import Split
    from raypt.models.init import Partition
    from raypt.tasks.base import Task

Batch = dict  # name -> tensor, as the data stream yields it; train batches carry `weight` (raypt.data.split)
LossFn = Callable[["torch.nn.Module", Batch], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]



@dataclass(frozen=True)
class Shard:
    """What this rank holds of one parameter, as writable flat views: its fp32 master slice (full elements
    [start, start + master.numel()) of the flattened parameter), Adam's moments over the same slice (empty before
    Adam's first step), and each copy the forward reads, with the full flat index its view begins at (the whole
    replicated parameter under ZeRO 0-2, the same slice under ZeRO-3 plus the gathered parameter where ZeRO-3
    keeps it gathered; the master itself in fp32 ZeRO-0). A frozen parameter (MAE's fixed position embeddings)
    has no master and no moments: `master` is then its working copy, which nothing updates."""
    name: str
    shape: tuple[int, ...]  # of the full parameter
    start: int
    master: "torch.Tensor"
    moments: "tuple[torch.Tensor, ...]"
    working: "tuple[tuple[torch.Tensor, int], ...]"
    trainable: bool = True
    replicated: bool = False  # every data-parallel rank holds this same view (so one of them writes it)
    copy: bool = False  # another pipeline stage holds and writes this same parameter (a tied embedding)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Topology:
    """Where this process sits: its rank in the whole group, in its data-parallel group, and its pipeline stage
    (rank = stage x dp_size + dp_rank, DeepSpeed's pipe-major order)."""
    world: int
    rank: int
    dp_size: int
    dp_rank: int
    stage: int = 0
    stages: int = 1

    @classmethod
    def data_parallel(cls, world: int, rank: int) -> "Topology":
        return cls(world, rank, world, rank)


class Engine(ABC):
    """Builds the distributed model and optimizer, runs steps, and exposes state as full tensors by name."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[Metric, ...]] = ()  # anything train_step reports beyond the loss

    topology: Topology
    split: "Split"  # how each global batch is cut into this rank's micro-batches
    micro_batches: int  # micro-batches this rank feeds per optimizer step
    device: "torch.device"
    module: "torch.nn.Module"  # what the task's loss is called on
    # Set by the non-finite-loss policy (raypt/hooks/nonfinite.py): called once per step before the update with
    # whether this rank's losses were finite; False skips the update on every rank (the gate makes them agree).
    update_gate: Optional[Callable[["torch.Tensor"], bool]] = None
    pinned: bool = False  # batches copied to the device from pinned host memory (fast.pin_memory)

    @property
    def dp_rank(self) -> int:
        return self.topology.dp_rank

    @property
    def dp_size(self) -> int:
        return self.topology.dp_size

    @property
    def dp_group(self):
        """The process group of this rank's data-parallel peers (None: the whole group)."""
        return None

    @property
    def consumes_data(self) -> bool:
        """Whether this rank reads input batches (every rank here; a pipeline's first and last stages)."""
        return True

    @property
    def readers(self) -> int:
        """Ranks that read each data-parallel rank's batches (the feed assembles each window once for them)."""
        return 1

    @classmethod
    def place(cls, cfg: "JobConfig", world: int, rank: int) -> Topology:
        """Where rank `rank` of `world` sits in this engine's layout."""
        return Topology.data_parallel(world, rank)

    @classmethod
    def partition(cls, cfg: "JobConfig", topology: Topology) -> Optional["Partition"]:
        """How to build a model this engine partitions as it is constructed; None: built in full on every rank."""
        return None

    @classmethod
    def construct(cls, task: "Task", cfg: "JobConfig", topology: Topology) -> "torch.nn.Module":
        """The model this rank holds, initialised by name: the task's, built as `partition` says."""
        model = task.build_model(cfg.run.seed, cls.partition(cfg, topology))
        if cfg.fast.activation_checkpointing:
            from raypt.models.recompute import checkpoint_blocks

            checkpoint_blocks(model)
        if cfg.fast.compile:
            from raypt.models.compiled import compile_blocks

            compile_blocks(model)
        return model

    @classmethod
    @abstractmethod
    def build(cls, model: "torch.nn.Module", cfg: "JobConfig", topology: Topology,
              restore: Optional["Reader"] = None) -> "Engine":
        """Wrap a freshly built model; with `restore`, continue from that checkpoint's weights and optimizer."""

    @abstractmethod
    def train_step(self, batches: Iterator[Batch], loss_fn: LossFn) -> "tuple[torch.Tensor, dict]":
        """One optimizer step over `micro_batches` batches drawn from `batches`, each loss scaled by its batch's
        `weight`: (weighted mean loss, weighted mean metrics); their mean over the ranks is the global batch's."""

    @abstractmethod
    def eval_step(self, batch: Batch, loss_fn: LossFn) -> "tuple[torch.Tensor, dict]":
        """Loss (and metrics) of one batch without gradients."""

    @abstractmethod
    def set_lr(self, lr: float) -> None: ...

    @abstractmethod
    def optimizer_steps(self) -> int:
        """Adam's step counter (bias correction), saved with the checkpoint."""

    @abstractmethod
    def state_tensors(self) -> Iterator[tuple[str, int, Optional["torch.Tensor"]]]:
        """Collective: every rank walks the same keys (`param/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME`) and gets
        (key, owner rank, full fp32 tensor) where it is the owner, (key, owner, None) elsewhere."""

    @property
    def shards_masters(self) -> bool:
        """Whether the fp32 masters are split over the data-parallel ranks (else every rank holds them all)."""
        return True

    def shards(self) -> Iterator[Shard]:
        """This rank's views of every parameter, in `named_parameters` order; writing them edits the
        engine's state in place (masking, pruning). The step copied the masters into the working copy, so whoever
        edits a master edits the working copy the same way."""
        raise NotImplementedError(f"the {self.name} engine does not expose its parameters' local state")

    def local_to_device(self, batch: Batch) -> Batch:
        """The batch on this rank's device; with `fast.pin_memory`, copied from pinned host memory, so the copy
        runs by DMA while the host goes on (from pageable memory a non-blocking copy is synchronous)."""
        if self.pinned:
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
