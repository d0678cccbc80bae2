"""Warm-up, then one decay shape from the peak down to min_lr_ratio x peak at the run's last token (Gupta et al.
2023, arXiv 2308.04014, algorithms.md A.1, for the cosine; Hägele et al. 2024, arXiv 2405.18392, for linear and
1-sqrt): the base of `cosine`, `linear`, `1-sqrt` and `rewarm`."""
from __future__ import annotations

from abc import abstractmethod

from pydantic import Field

from raypt.schedules.shapes import DecayShape, decay
from raypt.schedules.warmup import Warmup


class DecayToMin(Warmup):
    """Linear warm-up, then `shape()` from the peak to `min_lr_ratio` x peak at the run's last token, held after."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the value at the end of the run, as a share of "
                                "peak; 1 = no decay")

    @abstractmethod
    def shape(self) -> DecayShape:
        """How the value falls after the warm-up."""

    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        progress = min(1.0, (tokens - warm) / max(1.0, total_tokens - warm))
        return decay(self.shape(), progress, peak, self.min_lr_ratio * peak)

