"""Warmup-stable-decay: warm-up, the peak, then a decay window at the end of the run."""
from __future__ import annotations

from typing import Literal

from raypt.schedules.base import register
from raypt.schedules.decay_window import DecayWindow


@register
class WSD(DecayWindow):
    """Warmup-stable-decay (Hu et al. 2024, MiniCPM, arXiv 2404.06395; Hägele et al. 2024, arXiv 2405.18392):
    linear warm-up, the peak until the decay window (`decay` share or `decay_tokens` at the end of the run), then
    `decay_shape` down to `min_lr_ratio` x peak at the run's last token. A checkpoint from the stable phase is a
    point to continue from; only the window depends on the run's length."""
    name: Literal["wsd"] = "wsd"

    def main(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        return peak
