"""Engines: one registry. Each engine is one module implementing `raypt.engines.base.Engine`."""
from __future__ import annotations

from raypt.config import JobConfig
from raypt.engines.base import Engine, Topology
from raypt.engines.pipeline import PipelineEngine
from raypt.engines.zero import ZeroEngine

ENGINES: dict[str, type[Engine]] = {ZeroEngine.name: ZeroEngine, PipelineEngine.name: PipelineEngine}


def select(cfg: JobConfig) -> type[Engine]:
    """The engine a job runs on: DeepSpeed's pipeline engine when `pipeline.stages` > 1, else ZeRO."""
    return ENGINES["pipeline" if cfg.pipeline.stages > 1 else "zero"]


__all__ = ["ENGINES", "Engine", "Topology", "select"]
