"""Job config: YAML + dotted overrides -> validated pydantic sections, with errors a user can act on.

data (what a run reads), job (every other section, and what shapes a run's trajectory), load (YAML, overrides,
error messages, the data check), explain (`raypt config explain`), fields (what both read of the schema). The
`model:` section is the task's own (raypt.tasks), `train.schedule` the schedule's own (raypt.schedules).
"""
from raypt.config.data import AudioConfig, DataConfig, ImageConfig, PrepareConfig, SourceConfig, StageConfig
from raypt.config.explain import explain
from raypt.config.job import (CheckpointConfig, DeepSpeedConfig, FailureConfig, FaultsConfig, JobConfig, ModelConfig,
                              RunConfig, S3Config, ScalingConfig, ScheduleConfig, TrainConfig, WorkerRange,
                              trajectory_diff)
from raypt.config.load import apply_override, from_dict, load, to_dict
from raypt.schema import ConfigError, Section, absolute

__all__ = [
    "AudioConfig", "CheckpointConfig", "ConfigError", "DataConfig", "DeepSpeedConfig", "FailureConfig",
    "FaultsConfig", "ImageConfig", "JobConfig", "ModelConfig", "PrepareConfig", "RunConfig", "S3Config",
    "ScalingConfig", "ScheduleConfig", "Section", "SourceConfig", "StageConfig", "TrainConfig", "WorkerRange",
    "absolute", "apply_override", "explain", "from_dict", "load", "to_dict",
    "trajectory_diff",
]
