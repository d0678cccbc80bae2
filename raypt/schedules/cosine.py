"""Warmup, then a half cosine from the peak down to min_lr_ratio x peak at the run's last token."""
from __future__ import annotations

from typing import Literal

from raypt.schedules.base import register
from raypt.schedules.decay import DecayToMin
from raypt.schedules.shapes import DecayShape


@register
class Cosine(DecayToMin):
    """Linear warmup, then a half cosine from the peak to `min_lr_ratio` x peak at the run's last token."""
    name: Literal["cosine"] = "cosine"

    def shape(self) -> DecayShape:
        return "cosine"
