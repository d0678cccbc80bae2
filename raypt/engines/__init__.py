"""Engines: one registry. Each engine is one module implementing `raypt.engines.base.Engine`."""
from __future__ import annotations

from raypt.config import JobConfig
from raypt.engines.base import Engine, Topology
from raypt.engines.zero import ZeroEngine

ENGINES: dict[str, type[Engine]] = {ZeroEngine.name: ZeroEngine}


def select(cfg: JobConfig) -> type[Engine]:
    """The engine a job runs on: DeepSpeed ZeRO today (a pipeline engine joins when `pipeline.stages` > 1)."""
    return ENGINES["zero"]


__all__ = ["ENGINES", "Engine", "Topology", "select"]
