"""The job: every section of a run's config, and which of its settings shape the run's trajectory."""
from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field, field_validator, model_validator

from raypt.config.data import DataConfig
from raypt.config.fast import FastConfig
from raypt.config.pipeline import PipelineConfig
from raypt.metrics.trackers import TRACKERS
from raypt.schedules import ScheduleUnion
from raypt.schema import Location, Section
from raypt.sparsity.config import SparsityConfig
from raypt.tasks import TaskConfigUnion

Beta = Annotated[float, Field(ge=0, lt=1)]
ModelConfig = TaskConfigUnion  # `model:`: the config of the task its `task` key names (see raypt.tasks)
UNSHAPING_TRAIN = {"steps", "eval_every", "eval_batches", "on_nonfinite"}  # train settings outside trajectory()
ScheduleConfig = ScheduleUnion  # `train.schedule:`: the schedule its `name` key names (see raypt.schedules)
TrackerName = Literal[tuple(TRACKERS)]  # `run.trackers`: the registry's names (see raypt.metrics.trackers)


class TrainConfig(Section):
    """Optimizer steps, batch sizes and the AdamW recipe."""
    steps: int = Field(200, ge=1, description="optimizer steps in the run; a finished run given more resumes "
                       "where its schedule's next value does not depend on the run's length (constant, infinite; "
                       "a cosine is refused: see run.init_from)")
    global_batch: int = Field(16, ge=1, description="samples per optimizer step, whatever the world size")
    micro_batch: int = Field(8, ge=1, description="most samples per rank per forward/backward; each rank "
                             "takes global_batch / workers samples per step (one more on some ranks when that does "
                             "not divide), in as many micro-batches as that needs")
    lr: float = Field(3e-3, gt=0, le=1, description="peak learning rate, which train.schedule scales")
    weight_decay: float = Field(0.1, ge=0, description="AdamW's decoupled weight decay, on weight matrices only "
                                "(not norms or biases); 0 = none")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW's decay rates of its first and second "
                                     "moment estimates")
    eps: float = Field(1e-8, gt=0, description="AdamW's term added to the denominator")
    grad_clip: float = Field(1.0, ge=0, description="clip the global gradient norm to this; 0 = no clipping")
    eval_every: int = Field(50, ge=1, description="steps between validation losses (the last step always has one)")
    eval_batches: int = Field(4, ge=1, description="global batches of the validation split each evaluation "
                              "reads (the same ones every time)")
    schedule: ScheduleConfig = Field(default_factory=dict, validate_default=True, description="the learning rate "
                                     "as a function of global tokens seen; `name` picks the schedule")
    on_nonfinite: Literal["stop", "skip", "rollback"] = Field("stop", description="a step whose loss is NaN or "
                                                              "infinite on any rank: stop = the run fails naming "
                                                              "the step, its checkpoints intact; skip = that "
                                                              "update is not applied and training goes on; "
                                                              "rollback = restart from the last good checkpoint "
                                                              "and skip that step's batch (a restart: needs "
                                                              "failure.max_failures != 0)")


class DeepSpeedConfig(Section):
    """How each rank holds and updates the model (DeepSpeed ZeRO)."""
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO: 0 = plain data parallel; 1 shards optimizer "
                                            "state, 2 also gradients, 3 also parameters")
    offload: Literal["none", "cpu"] = Field("none", description="keep optimizer state (and ZeRO-3's parameters) "
                                            "in CPU memory")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto = bf16 on GPUs that "
                                                               "have it, else fp16 on GPUs; fp32 on CPUs")


class WorkerRange(Section):
    """An elastic run: Ray Train starts with what it can get in [min, max] and grows when workers join."""
    min: int = Field(ge=1, description="fewest workers the run trains with")
    max: int = Field(ge=1, description="most workers the run grows to")

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.min > self.max:
            raise ValueError(f"scaling.workers.min ({self.min}) must be <= scaling.workers.max ({self.max})")
        return self


class ScalingConfig(Section):
    """How many Ray Train workers (ranks), with what resources."""
    workers: Union[Annotated[int, Field(ge=1)], WorkerRange] = Field(2, description="ranks: a fixed count, or "
                                                                      "{min, max} for an elastic run")
    use_gpu: Union[Literal["auto"], bool] = Field("auto", description="one GPU per worker; auto = when the cluster "
                                                  "has GPUs")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker (CPU ranks also use this "
                                   "many threads)")
    resize_interval_s: float = Field(60.0, gt=0, description="seconds between an elastic run's checks for more "
                                     "workers")

    def world_sizes(self) -> list[int]:
        if isinstance(self.workers, int):
            return [self.workers]
        return list(range(self.workers.min, self.workers.max + 1))


class CheckpointConfig(Section):
    """When checkpoints are written and how many are kept."""
    every: int = Field(50, ge=1, description="steps between checkpoints (the last step always has one)")
    keep: int = Field(3, ge=1, description="newest good checkpoints kept in the run folder; older ones are deleted")
    memory_every: int = Field(0, ge=0, description="steps between in-memory snapshots in Ray's object store, each "
                              "rank's share on its node and on one other (raypt/checkpoint/memory.py): a lost "
                              "worker or node costs at most this many steps; 0 = off (benchmarks/recovery.py "
                              "measures the cost at 10 and at 1)")
    memory_limit_gb: float = Field(4.0, gt=0, description="object-store memory the snapshots may take on each node "
                                   "(the newest complete snapshot and the one being made): a share that does not "
                                   "fit is an error naming this setting")


class FailureConfig(Section):
    """How a run survives errors and preemptions."""
    max_failures: int = Field(0, ge=-1, description="worker-group restarts after errors; -1 = unlimited")
    max_preemption_failures: int = Field(-1, ge=-1, description="restarts after node reclaims; -1 = unlimited")
    sigterm_grace_s: float = Field(25.0, gt=0, description="seconds a SIGTERM'd worker has to commit a checkpoint")
    preemption_check_every: int = Field(20, ge=0, description="steps between Ray node-drain checks; 0 = off")
    step_timeout_s: float = Field(600.0, gt=0, description="seconds a rank may go without finishing a step (its "
                                  "evaluation and checkpoint write included) before its watchdog ends the worker, "
                                  "and the timeout of every collective: a stuck rank becomes a worker failure that "
                                  "max_failures restarts")


class FaultsConfig(Section):
    """Chaos drills: each fault fires once per run, never again after the restart it causes (unless `repeat`)."""
    kill_at_step: Optional[int] = Field(None, ge=1, description="SIGKILL the worker process of kill_rank at this "
                                        "step; None = never")
    kill_rank: int = Field(0, ge=0, description="the rank kill_at_step, sigterm_at_step, hang_at_step, "
                           "nan_loss_at_step and kill_reader_at_step hit")
    hang_at_step: Optional[int] = Field(None, ge=1, description="make kill_rank stop making progress before this "
                                        "step (a stuck rank, for failure.step_timeout_s); None = never")
    nan_loss_at_step: Optional[int] = Field(None, ge=1, description="make kill_rank's loss (and so its gradients) "
                                            "NaN at this step (for train.on_nonfinite); None = never")
    raise_at_step: Optional[int] = Field(None, ge=1, description="raise an error on rank 0 at this step; "
                                         "None = never")
    sigterm_at_step: Optional[int] = Field(None, ge=1, description="SIGTERM the worker process of kill_rank at "
                                           "this step (a preemption); None = never")
    kill_reader_at_step: Optional[int] = Field(None, ge=1, description="SIGKILL the read task that decodes "
                                               "kill_rank's samples of this step, mid-task, once (repeat does not "
                                               "apply: Ray runs the task again); None = never")
    corrupt_checkpoint_at_step: Optional[int] = Field(None, ge=1, description="tear rank 0's shard of this step's "
                                                      "checkpoint after it is written; None = never")
    repeat: bool = Field(False, description="fire on every attempt, not once per run: a drill of a run that can "
                         "never succeed (its retries must end in a clear failure)")


class InitFrom(Section):
    """A new run that starts from another model's weights: continual pre-training on new data. Unlike
    run.resume_from (an exact fork) the step, token and sample counters and the data position start from 0, so the
    schedule, the data mix and train.steps are this run's own."""
    path: Location = Field(description="a raypt checkpoint folder (runs/NAME/stepNNNNNN: any world size, any ZeRO "
                           "stage) or a Hugging Face model folder holding safetensors (a raypt export, or any folder "
                           "whose tensors have this model's names and shapes), local or s3://")
    optimizer: Literal["keep", "reset"] = Field("reset", description="keep = Adam's moments and step counter "
                                                "(bias correction) from a raypt checkpoint, together; reset = a "
                                                "fresh optimizer, the only choice for a Hugging Face folder, which "
                                                "holds none")


class RunConfig(Section):
    """The run's name, where it lives, its seed, and where its metrics go."""
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the run folder; "
                      "the same name resumes it")
    storage: Location = Field("runs", validate_default=True, description="folder or s3:// URI that holds run "
                              "folders (checkpoints, metrics, export)")
    seed: int = Field(0, ge=0, description="seeds the weights, the data order and augmentations, and masking")
    log_every: int = Field(1, ge=1, description="steps between metrics records (evaluations and checkpoints are "
                           "always recorded)")
    log_sample_ids: bool = Field(False, description="record every step's global sample ids (audits resumes)")
    resume_from: Optional[Location] = Field(None, description="a checkpoint folder to start from (any world size) "
                                            "when the run folder has none (checked before any cluster work); "
                                            "once the run has checkpoints of its own they win, and `raypt train` "
                                            "prints a note naming both; None = from scratch")
    init_from: Optional[InitFrom] = Field(None, description="start a new run from a checkpoint's or a Hugging "
                                          "Face folder's weights when the run folder has no checkpoint of its own "
                                          "(a path, or {path, optimizer}); None = the task's fresh initialisation")
    trackers: list[TrackerName] = Field(["tensorboard"], description="where metrics go besides metrics.jsonl; "
                                        "servers, modes and credentials come from the environment only "
                                        "(MLFLOW_TRACKING_URI, WANDB_MODE, WANDB_API_KEY, ...)")
    group: Optional[str] = Field(None, min_length=1, description="runs that belong together, e.g. the trials of one "
                                 "sweep; trackers group by it (MLflow experiment name, W&B group); None = the run "
                                 "stands alone")

    @field_validator("init_from", mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value  # `run.init_from=runs/a/step000100`

    @model_validator(mode="after")
    def _one_origin(self) -> "RunConfig":
        if self.init_from is not None and self.resume_from is not None:
            raise ValueError(f"run.init_from: set together with run.resume_from={self.resume_from}; resume_from "
                             "continues a run exactly (step, tokens, optimizer, data position), init_from starts a "
                             "new run from a model's weights: set one of them")
        return self

    @field_validator("trackers")
    @classmethod
    def _unique(cls, names: list[str]) -> list[str]:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"run.trackers: {names} lists {', '.join(twice)} more than once; allowed: "
                             f"{', '.join(TRACKERS)}, each at most once")
        return names


class S3Config(Section):
    """Where s3:// paths live. Credentials come from the standard AWS environment or a named profile, never from
    the job file: job files end up in version control, logs and checkpoints."""
    endpoint: Optional[str] = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO; None = AWS")
    region: Optional[str] = Field(None, description="e.g. us-east-1; None = the AWS environment's")
    profile: Optional[str] = Field(None, description="a profile of ~/.aws/credentials; None = the environment's")

    def env(self) -> dict[str, str]:
        """The standard AWS variables these settings stand for, so every process (read tasks too) sees them."""
        pairs = (("AWS_ENDPOINT_URL", self.endpoint), ("AWS_REGION", self.region), ("AWS_PROFILE", self.profile))
        return {k: v for k, v in pairs if v}


class JobConfig(Section):
    """A whole job: one YAML file plus dotted overrides."""
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=dict, validate_default=True, description="what the model learns "
                               "and its sizes; `task` picks the task (see raypt/tasks)")
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    failure: FailureConfig = Field(default_factory=FailureConfig)
    faults: FaultsConfig = Field(default_factory=FaultsConfig)
    s3: S3Config = Field(default_factory=S3Config)
    sparsity: SparsityConfig = Field(default_factory=SparsityConfig, description="gradual magnitude pruning; "
                                     "final = 0 (the default) trains dense")
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    fast: FastConfig = Field(default_factory=FastConfig)

    @model_validator(mode="after")
    def _batch_covers_ranks(self) -> "JobConfig":
        # Any split works (raypt.data.split weights unequal shares); each rank needs one sample per step.
        most = max(self.scaling.world_sizes())
        if self.train.global_batch < most:
            raise ValueError(f"train.global_batch: {self.train.global_batch} is smaller than the largest world "
                             f"size ({most} workers); every rank needs at least one sample per step, so use "
                             f"train.global_batch >= {most} or fewer workers")
        if self.faults.kill_rank >= max(self.scaling.world_sizes()):
            raise ValueError(f"faults.kill_rank: {self.faults.kill_rank} is not a rank of a run with at most "
                             f"{max(self.scaling.world_sizes())} workers")
        return self

    @model_validator(mode="after")
    def _task_fits(self) -> "JobConfig":
        self.model.check_job(self)
        self.pipeline.check_job(self)
        self.fast.check_job(self)
        return self

    @model_validator(mode="after")
    def _rollback_restarts(self) -> "JobConfig":
        if self.train.on_nonfinite == "rollback" and self.failure.max_failures == 0:
            raise ValueError("train.on_nonfinite: rollback restarts the run from its last good checkpoint, which "
                             "failure.max_failures=0 forbids; allow restarts (failure.max_failures >= 1, or -1) or "
                             "use stop or skip")
        return self

    def trajectory(self) -> dict:
        """The settings that shape a run's trajectory (its losses and weights, step by step), so a run folder's
        checkpoint written by another job is caught before it is resumed:

        - all of `model` (the task and its sizes);
        - all of `train` except `steps` (a finished run given more steps is the same run), `eval_every` and
          `eval_batches` (evaluation only reads), and `on_nonfinite` (a run stopped at a NaN resumes with skip);
        - `run.seed` (weights, data order, augmentations, masks);
        - `sparsity`, when it prunes (final > 0);
        - of `data`: each source's `name` and `weight` in mix order (`main` for a run on data.path alone), not its
          path: the same data moved to another machine or bucket is the same run; `data.stages`; and `data.image`
          and `data.audio` (what the model sees of each sample).

        Left out, as they change how a run is executed or observed, not what it computes: paths and storage,
        prefetch depth, evaluation, logging and checkpoint cadence, where metrics go (`run.trackers`,
        `run.group`), scaling (the global batch is held constant across world sizes), deepspeed, the pipeline
        layout, fast paths, failure handling, fault drills, S3 settings, and how data was prepared.
        """
        train = self.train.model_dump(mode="json", exclude=UNSHAPING_TRAIN)
        data = self.data.model_dump(mode="json", include={"stages", "image", "audio"})
        data["sources"] = [{"name": s.name, "weight": s.weight} for s in self.data.mix()]
        # Sparsity shapes a pruned run only: a dense run's trajectory (and so older checkpoints' digests) is as it was.
        sparse = {"sparsity": self.sparsity.model_dump(mode="json")} if self.sparsity.final > 0 else {}
        return {"model": self.model.model_dump(mode="json"), "train": train, "run": {"seed": self.run.seed},
                "data": data, **sparse}

    def digest(self) -> str:
        """A short hash of trajectory(), stored in checkpoints."""
        return hashlib.sha256(json.dumps(self.trajectory(), sort_keys=True).encode()).hexdigest()[:16]


def as_today(saved: dict) -> dict:
    """A trajectory as an older raypt saved it, read through today's schema: settings added since take their
    defaults, which compute what that run computed, so its checkpoints still resume. Left as saved when today's
    schema no longer reads it."""
    from pydantic import TypeAdapter, ValidationError

    try:
        model = TypeAdapter(ModelConfig).validate_python(saved["model"]).model_dump(mode="json")
        train = TrainConfig.model_validate(saved["train"]).model_dump(mode="json", exclude=UNSHAPING_TRAIN)
    except (KeyError, TypeError, ValidationError):
        return saved
    return {**saved, "model": model, "train": train}


def trajectory_diff(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between a checkpoint's trajectory and a job's (a key only one has counts
    as differing, after `as_today`)."""
    def walk(a: Any, b: Any, key: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [k for name in sorted(set(a) | set(b), key=str)
                    for k in walk(a.get(name), b.get(name), f"{key}.{name}" if key else str(name))]
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            return [k for i, (x, y) in enumerate(zip(a, b)) for k in walk(x, y, f"{key}.{i}")]
        return [] if a == b else [key]

    return walk(as_today(saved), current, "")
