"""Warm-up, an inverse-square-root decay, then a cooldown window at the end of the run."""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field

from raypt.schedules.base import register, span
from raypt.schedules.decay_window import DecayWindow


@register
class InverseSqrt(DecayWindow):
    """Linear warm-up, then peak / sqrt(1 + (tokens - warm-up end) / timescale) (Zhai et al. 2022, arXiv
    2106.04560, "rsqrt"; with the timescale equal to the warm-up it is Vaswani et al. 2017's peak x sqrt(warm-up /
    tokens)), then the cooldown: the decay window at the end of the run (`decay` share or `decay_tokens`), where
    `decay_shape` takes the value from where the inverse square root got to down to `min_lr_ratio` x peak (Hägele
    et al. 2024, arXiv 2405.18392, §3)."""
    name: Literal["inverse-sqrt"] = "inverse-sqrt"
    timescale_tokens: Optional[float] = Field(None, gt=0, description="the timescale in tokens, which stays put "
                                              "when the run is made longer; None = `timescale`, a share of the run")
    timescale: float = Field(0.05, gt=0, description="share of the run's tokens after the warm-up by which "
                             "the value has fallen to peak / sqrt(2); the default equals the default warm-up")
    def main(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        tau = span(self.timescale, self.timescale_tokens, total_tokens)
        return peak / math.sqrt(1 + (tokens - warm) / tau)
