"""Job config: YAML + dotted overrides -> validated dataclasses, with errors a user can act on."""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a job config: one message that names the field, the value and what is allowed."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    task: Literal["clm", "mae", "multimodal"] = Field("clm", description="what the model learns; see raypt/tasks")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: Optional[int] = Field(None, ge=1)
    intermediate_size: Optional[int] = Field(None, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)
    patch_size: int = Field(4, ge=1, description="image patch side; audio: mel frames per token")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="MAE: share of patches hidden from the encoder")
    decoder_hidden_size: int = Field(64, ge=8)
    decoder_layers: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.num_heads: {self.num_heads} must divide model.hidden_size ({self.hidden_size})")
        if self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_kv_heads: {self.num_kv_heads} must divide model.num_heads ({self.num_heads})")
        return self


class PrepareConfig(Section):
    """How `raypt data prepare` turns raw files into shards; inputs are files, folders or globs, local or s3://."""
    source: Literal["stdlib", "text", "images", "audio", "skimage", "stdlib-audio"] = Field(
        "stdlib", description="stdlib (code), skimage (images) and stdlib-audio ship with the install; text, images "
        "and audio read data.prepare.inputs")
    inputs: list[str] = Field(default_factory=list, description="text: .txt/.jsonl/.parquet; images: image files "
                              "or .parquet; audio: .wav/.flac")
    text_field: str = Field("text", description="JSONL key or Parquet column holding a document")
    image_field: str = Field("image", description="Parquet column holding encoded image bytes")
    image_max_side: Optional[int] = Field(None, ge=8, description="store images shrunk to this longest side "
                                          "(as PNG); unset = as they are")
    tokenizer: Optional[str] = Field(None, description="a prepared dataset whose tokenizer to reuse: text "
                                     "sources mixed in one run must share one vocabulary")
    max_bytes: int = Field(6_000_000, ge=10_000)
    vocab_size: int = Field(2048, ge=260, le=262144)
    seq_len: int = Field(128, ge=8)
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    rows_per_group: int = Field(256, ge=1)


class ImageConfig(Section):
    size: int = Field(32, ge=8, description="side of the square crops fed to the model")
    crop_scale: tuple[float, float] = (0.35, 1.0)
    flip: bool = True
    jitter: float = Field(0.4, ge=0, le=1, description="brightness/contrast/saturation jitter strength")
    views: Literal[1, 2] = Field(1, description="augmented views per image (2 for contrastive tasks)")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


class AudioConfig(Section):
    sample_rate: int = Field(16000, ge=1000)
    seconds: float = Field(1.0, gt=0, description="clip length: longer audio is cropped, shorter zero-padded")
    n_mels: int = Field(40, ge=8)
    n_fft: int = Field(400, ge=16)
    hop: int = Field(160, ge=1)


class SourceConfig(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    path: str = Field(description="a prepared dataset (its manifest.json), local or s3://")
    weight: float = Field(1.0, ge=0, description="share of every global batch, as exact counts")
    prepare: PrepareConfig = PrepareConfig()


class StageConfig(Section):
    at_tokens: int = Field(ge=1, description="global tokens seen from which these weights hold")
    weights: dict[str, float]


class DataConfig(Section):
    path: str = "data/stdlib"
    sources: list[SourceConfig] = Field(default_factory=list, description="a mix; empty = data.path alone")
    stages: list[StageConfig] = Field(default_factory=list, description="weights that change at token counts")
    prefetch_batches: int = Field(4, ge=0)
    prepare: PrepareConfig = PrepareConfig()
    image: ImageConfig = ImageConfig()
    audio: AudioConfig = AudioConfig()
    on_bad_record: Literal["skip", "fail"] = Field("skip", description="a record `data prepare` cannot read")
    max_bad_fraction: float = Field(0.01, ge=0, le=1, description="skip no more than this share of records")

    @model_validator(mode="after")
    def _mix_is_consistent(self) -> "DataConfig":
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"data.sources: names must be unique, got {names}")
        if self.sources and not sum(s.weight for s in self.sources) > 0:
            raise ValueError("data.sources: at least one weight must be > 0")
        allowed = names or ["main"]
        last = 0
        for i, stage in enumerate(self.stages):
            unknown = sorted(set(stage.weights) - set(allowed))
            if unknown:
                raise ValueError(f"data.stages.{i}.weights: unknown source {unknown[0]!r}; sources are {allowed}")
            if any(w < 0 for w in stage.weights.values()) or not sum(stage.weights.values()) > 0:
                raise ValueError(f"data.stages.{i}.weights: got {stage.weights}; weights must be >= 0, one > 0")
            if stage.at_tokens <= last:
                raise ValueError(f"data.stages.{i}.at_tokens: got {stage.at_tokens}; stages must start in "
                                 f"increasing token order (previous {last})")
            last = stage.at_tokens
        return self

    def mix(self) -> list[SourceConfig]:
        """The sources of a run: `data.sources`, or `data.path` alone as the source 'main'."""
        return self.sources or [SourceConfig(name="main", path=self.path, prepare=self.prepare)]

    def stage_weights(self) -> list[tuple[int, list[float]]]:
        """(at_tokens, weight per source) from the start, each stage naming only the weights it changes."""
        weights = [s.weight for s in self.mix()]
        out = [(0, list(weights))]
        for stage in self.stages:
            names = [s.name for s in self.mix()]
            weights = [stage.weights.get(n, w) for n, w in zip(names, weights)]
            out.append((stage.at_tokens, list(weights)))
        return out


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


class S3Config(Section):
    """Where s3:// paths live. Credentials come from the standard AWS environment or a named profile, never from
    the job file: job files end up in version control, logs and checkpoints."""
    endpoint: Optional[str] = Field(None, description="e.g. http://127.0.0.1:9000 for MinIO; unset = AWS")
    region: Optional[str] = None
    profile: Optional[str] = Field(None, description="a profile of ~/.aws/credentials")

    def env(self) -> dict[str, str]:
        """The standard AWS variables these settings stand for, so every process (read tasks too) sees them."""
        pairs = (("AWS_ENDPOINT_URL", self.endpoint), ("AWS_REGION", self.region), ("AWS_PROFILE", self.profile))
        return {k: v for k, v in pairs if v}


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
    s3: S3Config = S3Config()

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
        setattr(sub, key, absolute(getattr(sub, key)))
    os.environ.update(cfg.s3.env())  # this process's S3 access; launch hands the same to every Ray process
    for source in cfg.data.sources:
        source.path = absolute(source.path)
    for prep in [cfg.data.prepare, *(s.prepare for s in cfg.data.sources)]:
        prep.inputs = [absolute(i) for i in prep.inputs]
        prep.tokenizer = absolute(prep.tokenizer)
    if check_data:
        check_data_path(cfg)
    return cfg


def absolute(path: Optional[str]) -> Optional[str]:
    return str(Path(path).expanduser().resolve()) if path and "://" not in path else path


def source_field(cfg: JobConfig, i: int) -> str:
    return f"data.sources.{i}.path" if cfg.data.sources else "data.path"


def check_data_path(cfg: JobConfig) -> list[dict]:
    """Every source is prepared, readable and fits the task; returns the manifests, in mix order."""
    from raypt import storage
    from raypt.data.manifest import modality, read_manifest
    from raypt.tasks import MODALITIES

    manifests = []
    for i, source in enumerate(cfg.data.mix()):
        try:
            manifests.append(read_manifest(source.path))
        except FileNotFoundError:
            raise ConfigError(f"{source_field(cfg, i)}: '{source.path}' holds no prepared dataset (manifest.json "
                              f"missing); create it with `raypt data prepare JOB`") from None
        except storage.StorageError as e:
            raise ConfigError(f"{source_field(cfg, i)}: {e}") from None
    takes = MODALITIES[cfg.model.task]
    for i, m in enumerate(manifests):
        if modality(m) not in takes:
            raise ConfigError(f"{source_field(cfg, i)}: holds {modality(m)} data, which model.task "
                              f"'{cfg.model.task}' does not take (it takes {', '.join(takes)})")
        if modality(m) == "text" and m["seq_len"] < 2:
            raise ConfigError(f"{source_field(cfg, i)}: '{m['root']}' has seq_len {m['seq_len']}; need >= 2")
    lengths = {m["seq_len"] for m in manifests if modality(m) == "text"}
    if len(lengths) > 1:
        raise ConfigError(f"data.sources: the text sources pack sequences of different lengths {sorted(lengths)}; "
                          f"prepare them with one data.sources.N.prepare.seq_len")
    vocabularies = {m["tokenizer_sha256"] for m in manifests if modality(m) == "text" and "tokenizer_sha256" in m}
    if len(vocabularies) > 1:
        raise ConfigError("data.sources: the text sources were tokenized with different tokenizers; prepare them "
                          "with data.sources.N.prepare.tokenizer set to one of them")
    return manifests


def to_dict(cfg: JobConfig) -> dict:
    return cfg.model_dump(mode="json")


def from_dict(d: dict) -> JobConfig:
    return JobConfig.model_validate(d)
