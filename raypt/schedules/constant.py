"""Warmup, then the peak for the rest of the run."""
from __future__ import annotations

from typing import Literal

from raypt.schedules.base import register
from raypt.schedules.warmup import Warmup


@register
class Constant(Warmup):
    """Linear warmup, then the peak value to the end (budget-free: a run given more steps carries on)."""
    name: Literal["constant"] = "constant"

    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        return peak
