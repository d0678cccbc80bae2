"""Warmup, then 1-sqrt from the peak down to min_lr_ratio x peak at the run's last token."""
from __future__ import annotations

from typing import Literal

from raypt.schedules.base import register
from raypt.schedules.decay import DecayToMin
from raypt.schedules.shapes import DecayShape


@register
class OneMinusSqrt(DecayToMin):
    """Linear warmup, then peak - (peak - min) x sqrt(progress) to `min_lr_ratio` x peak at the run's last token:
    fast at first, slow at the end; as a WSD cooldown it beat linear and cosine (Hägele et al. 2024,
    arXiv 2405.18392, §3)."""
    name: Literal["1-sqrt"] = "1-sqrt"

    def shape(self) -> DecayShape:
        return "1-sqrt"
