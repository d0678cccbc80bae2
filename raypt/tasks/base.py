"""What a task is: the model it builds, the loss it learns from, what it counts and exports, and its own section
of the job (`model:`). Light to import (config imports the registry): torch and transformers load inside methods."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Protocol, TypeVar

from pydantic import Field, model_validator

from raypt.data.features import AudioConfig, ImageConfig
from raypt.metrics import Metric
from raypt.schema import Section

if TYPE_CHECKING:
    from torch import Tensor, nn

    from raypt.models.init import Partition


class TaskConfig(Section):
    """The transformer sizes every task shares; each task adds its own fields and names itself in `task`."""
    task: str
    hidden_size: int = Field(128, ge=8, description="width of the residual stream (d_model)")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads; must divide hidden_size")
    num_kv_heads: Optional[int] = Field(None, ge=1, description="key/value heads (grouped-query attention); must "
                                        "divide num_heads; None = num_heads")
    intermediate_size: Optional[int] = Field(None, ge=8, description="width of each block's MLP; None = the "
                                             "task's rule (Llama: 8/3 x hidden_size, rounded to 32; ViT: 4x)")
    init_std: float = Field(0.02, gt=0, description="standard deviation of the normal initialisation of weights")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TaskConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads: {self.num_heads} must divide model.hidden_size ({self.hidden_size})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads: {self.num_kv_heads} must divide model.num_heads ({self.num_heads})")
        return self

    def check_job(self, job: Any) -> None:
        """Refuse (ValueError naming the field) settings of other sections this task cannot run with; the job's
        validation calls it once every section is read."""


class JobData(Protocol):
    @property
    def image(self) -> ImageConfig: ...

    @property
    def audio(self) -> AudioConfig: ...


class JobRun(Protocol):
    @property
    def seed(self) -> int: ...


class Job(Protocol):
    """The parts of a job a task reads; raypt.config.JobConfig is one. Named by shape, not imported: config
    imports the task registry to build `model`'s union, so a task importing config would close a cycle."""
    @property
    def model(self) -> TaskConfig: ...

    @property
    def data(self) -> JobData: ...

    @property
    def run(self) -> JobRun: ...


def sample_noise(positions: Tensor, seed: int, width: int) -> Tensor:
    """Uniform [0, 1) noise of `width` per row, keyed by (seed, the row's `position` in the batch): a sample's own
    randomness, different on every rank, the same at any world size and after a resume."""
    import numpy as np
    import torch

    rows = [np.random.default_rng([seed, int(p)]).random(width, dtype=np.float32) for p in positions.tolist()]
    return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, width), np.float32))


class Task(ABC):
    """One task of a run, built on every rank from the job and the prepared datasets' manifests by modality (as
    `raypt.tasks.by_modality` gives them)."""
    name: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]  # the data it takes; multimodal's order is the order its modules run in
    Config: ClassVar[type[TaskConfig]]  # its `model:` section, whose `task` is `name`
    metrics: ClassVar[tuple[Metric, ...]] = ()  # what `loss` reports beside the loss, with its cross-rank reduction
    pipelines: ClassVar[bool] = False  # whether it has a pipeline form (`pipeline_layers`, `row_losses`)

    def __init__(self, cfg: Job, manifests: dict[str, dict]):
        self.cfg, self.manifests = cfg, manifests

    def build_model(self, seed: int, partition: Optional["Partition"] = None) -> nn.Module:
        """Same seed -> same weights on every rank, at every ZeRO stage, built in full or partitioned (ZeRO-3:
        under `partition`, so that no rank holds the whole model): weights by name (raypt.models.init)."""
        import torch

        from raypt.models.init import constructing, init_by_name

        torch.manual_seed(seed)  # what constructors draw that no rule re-initialises
        if partition is None:
            with constructing():
                model = self.construct()
            init_by_name(model, seed)
            return model
        with torch.device("meta"), constructing():
            twin = self.construct()  # which parameters each module's rule writes, at no memory cost
        torch.manual_seed(seed)
        with partition.building(), constructing():
            model = self.construct()
        init_by_name(model, seed, twin, partition.gather)
        return model

    @abstractmethod
    def construct(self) -> nn.Module:
        """The model; build_model initialises its weights by name."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The scalar fp32 loss of a micro-batch, and the values of `metrics` (empty when it declares none).
        `model` may be a DeepSpeed engine: call it, so ZeRO-3's hooks see every forward."""

    def pipeline_layers(self) -> list:
        """The model as DeepSpeed pipeline layer specs, in order (raypt/engines/pipeline.py), each module knowing
        its `prefix` in the model `construct` builds, so that parameters keep their names and initial values."""
        raise NotImplementedError(f"the {self.name} task has no pipeline form")

    def row_losses(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """The pipeline's last-stage outputs of a micro-batch -> each row's loss (their mean is `loss`)."""
        raise NotImplementedError(f"the {self.name} task has no pipeline form")

    def hooks(self) -> tuple:
        """Loop hooks this task adds to every run (raypt/hooks/base.py), e.g. an evaluation of its own."""
        return ()

    @abstractmethod
    def tokens_per_sample(self, modality: str) -> int:
        """Tokens one sample of `modality` puts through the model (what tokens/s and the schedules count)."""

    @abstractmethod
    def flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """Training FLOPs (forward + backward) of one sample of `modality`, for MFU."""

    @abstractmethod
    def recompute_flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """FLOPs activation checkpointing adds per sample (the blocks' forward once more), for HFU."""

    @abstractmethod
    def export(self, model: nn.Module, out_dir: str) -> None:
        """Write the trained model to `out_dir` in a form that loads without raypt where the task allows."""


T = TypeVar("T", bound=Task)
TASKS: dict[str, type[Task]] = {}


def register(cls: type[T]) -> type[T]:
    """Class decorator: make a task selectable as `model.task: <name>`, its Config the `model:` section."""
    if cls.Config.model_fields["task"].default != cls.name:
        raise TypeError(f"{cls.__name__}.Config must declare task: Literal[{cls.name!r}] = {cls.name!r}")
    TASKS[cls.name] = cls
    return cls
