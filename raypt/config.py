"""Job config: YAML + dotted overrides -> validated dataclasses, with errors a user can act on."""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a job config: one message that names the field, the value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: Optional[int] = Field(None, ge=1)
    intermediate_size: Optional[int] = Field(None, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads: {self.num_heads} must divide model.hidden_size ({self.hidden_size})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads: {self.num_kv_heads} must divide model.num_heads ({self.num_heads})")
        return self


class PrepareConfig(Section):
    source: Literal["stdlib"] = "stdlib"
    max_bytes: int = Field(6_000_000, ge=10_000)
    vocab_size: int = Field(2048, ge=260, le=262144)
    seq_len: int = Field(128, ge=8)
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    rows_per_group: int = Field(256, ge=1)


class DataConfig(Section):
    path: str = "data/stdlib"
    prefetch_batches: int = Field(4, ge=0)
    prepare: PrepareConfig = PrepareConfig()


class ScheduleConfig(Section):
    name: Literal["cosine", "constant"] = "cosine"
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the run's tokens spent warming up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class TrainConfig(Section):
    steps: int = Field(200, ge=1)
    global_batch: int = Field(16, ge=1, description="sequences per optimizer step, whatever the world size")
    micro_batch: int = Field(8, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    eval_every: int = Field(50, ge=1)
    eval_batches: int = Field(4, ge=1)
    schedule: ScheduleConfig = ScheduleConfig()


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "cpu"] = "none"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"


class WorkerRange(Section):
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "WorkerRange":
        if self.min > self.max:
            raise ValueError(f"scaling.workers.min ({self.min}) must be <= scaling.workers.max ({self.max})")
        return self


class ScalingConfig(Section):
    workers: Union[int, WorkerRange] = Field(2)
    use_gpu: Union[Literal["auto"], bool] = "auto"
    cpus_per_worker: float = Field(1.0, gt=0)
    resize_interval_s: float = Field(60.0, gt=0, description="how often an elastic run checks for more workers")

    def world_sizes(self) -> list[int]:
        if isinstance(self.workers, int):
            return [self.workers]
        return list(range(self.workers.min, self.workers.max + 1))


class CheckpointConfig(Section):
    every: int = Field(50, ge=1, description="steps between checkpoints")
    keep: int = Field(3, ge=1)


class FailureConfig(Section):
    max_failures: int = Field(0, ge=-1, description="worker-group restarts after errors; -1 = unlimited")
    max_preemption_failures: int = Field(-1, ge=-1, description="restarts after node reclaims; -1 = unlimited")
    sigterm_grace_s: float = Field(25.0, gt=0, description="time a SIGTERM'd worker has to commit a checkpoint")
    preemption_check_every: int = Field(20, ge=0, description="steps between Ray node-drain checks; 0 = off")


class FaultsConfig(Section):
    """Chaos drills: each fault fires once per run, never again after the restart it causes."""
    kill_at_step: Optional[int] = Field(None, ge=1, description="SIGKILL the worker process of kill_rank")
    kill_rank: int = Field(0, ge=0)
    raise_at_step: Optional[int] = Field(None, ge=1)
    sigterm_at_step: Optional[int] = Field(None, ge=1, description="SIGTERM the worker process of kill_rank")
    corrupt_checkpoint_at_step: Optional[int] = Field(None, ge=1)


class RunConfig(Section):
    name: str = Field("quickstart", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    storage: str = "runs"
    seed: int = 0
    log_every: int = Field(1, ge=1)
    log_sample_ids: bool = False
    resume_from: Optional[str] = Field(None, description="a checkpoint folder to start from (any world size)")


class JobConfig(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: ScalingConfig = ScalingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    failure: FailureConfig = FailureConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _batch_divides(self) -> "JobConfig":
        for world in self.scaling.world_sizes():
            per_step = self.train.micro_batch * world
            if self.train.global_batch % per_step:
                raise ValueError(
                    f"train.global_batch: {self.train.global_batch} is not a multiple of train.micro_batch "
                    f"({self.train.micro_batch}) x workers ({world}) = {per_step}; the global batch is held constant "
                    f"at every world size, so pick a multiple of {per_step}")
        if self.faults.kill_rank >= max(self.scaling.world_sizes()):
            raise ValueError(f"faults.kill_rank: {self.faults.kill_rank} is not a rank of a run with at most "
                             f"{max(self.scaling.world_sizes())} workers")
        return self

    def digest(self) -> str:
        """Hash of what shapes the trajectory, stored in checkpoints to catch resuming a different job."""
        keep = self.model_dump(include={"model", "data", "train"}, mode="json")
        keep["train"].pop("steps")
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars/lists (data only, never code)."""
    return yaml.safe_load(text) if text != "" else ""


def _known_keys(model: type[BaseModel], parts: list[str]) -> list[str]:
    for part in parts:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _did_you_mean(path: list[str]) -> str:
    options = _known_keys(JobConfig, path[:-1])
    close = difflib.get_close_matches(path[-1], options, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}allowed keys: {', '.join(options)}" if options else "this section takes no sub-keys"


def apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like section.key=value (e.g. train.steps=200)")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{key}: cannot set a sub-key of '{part}', which holds {child!r}")
        node = child
    node[parts[-1]] = _parse_value(value)


def _format_error(err: ValidationError, raw: dict) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not str(p).startswith(("function-after", "int", "WorkerRange"))]
        path = ".".join(loc)
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key; {_did_you_mean(loc)}")
            continue
        if e["type"] == "value_error" or not path:
            lines.append(str(e["msg"]).removeprefix("Value error, "))
            continue
        value = e.get("input")
        allowed = e["msg"]
        lines.append(f"{path}: got {value!r}; {allowed}")
    return "invalid config:\n  " + "\n  ".join(dict.fromkeys(lines))


def load(path: Union[str, Path, None], overrides: Optional[list[str]] = None, check_data: bool = True) -> JobConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"job file: '{path}' does not exist")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"job file: '{path}' is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"job file: '{path}' must hold a mapping of sections, got {type(raw).__name__}")
    for o in overrides or []:
        apply_override(raw, o)
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, raw)) from None
    for section, key in (("data", "path"), ("run", "storage"), ("run", "resume_from")):  # workers have another cwd
        sub = getattr(cfg, section)
        value = getattr(sub, key)
        if value and "://" not in value:
            setattr(sub, key, str(Path(value).expanduser().resolve()))
    if check_data:
        check_data_path(cfg)
    return cfg


def check_data_path(cfg: JobConfig) -> None:
    from raypt.data.manifest import read_manifest

    try:
        manifest = read_manifest(cfg.data.path)
    except FileNotFoundError:
        raise ConfigError(f"data.path: '{cfg.data.path}' holds no prepared dataset (manifest.json missing); "
                          f"create it with `raypt data prepare JOB`") from None
    if manifest["seq_len"] < 2:
        raise ConfigError(f"data.path: '{cfg.data.path}' has seq_len {manifest['seq_len']}; need >= 2")


def to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json")


def from_dict(d: dict) -> JobConfig:
    return JobConfig.model_validate(d)
