"""Learning-rate schedules as functions of global tokens seen, so a restart at any world size keeps the curve."""
from __future__ import annotations

import math

from raypt.config import ScheduleConfig


def lr_at(tokens: float, total_tokens: float, peak: float, sched: ScheduleConfig) -> float:
    """LR for the step that brings the run to `tokens` tokens seen."""
    warm = sched.warmup * total_tokens
    if tokens < warm:
        return peak * tokens / warm
    if sched.name == "constant":
        return peak
    low = sched.min_lr_ratio * peak
    progress = min(1.0, (tokens - warm) / max(1.0, total_tokens - warm))
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))
