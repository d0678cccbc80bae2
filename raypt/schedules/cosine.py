"""Warmup, then a half cosine from the peak down to min_lr_ratio x peak at the run's last token."""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from raypt.schedules.base import register
from raypt.schedules.warmup import Warmup


@register
class Cosine(Warmup):
    """Linear warmup, then a half cosine from the peak to `min_lr_ratio` x peak at the run's last token."""
    name: Literal["cosine"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the value at the end of the run, as a share of "
                                "peak; 1 = no decay")

    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        low = self.min_lr_ratio * peak
        progress = min(1.0, (tokens - warm) / max(1.0, total_tokens - warm))
        return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))
