"""The curves schedules are made of, in one place: each maps a phase's progress (0 at its first token, 1 at its
last) to a value between the phase's `high` start and `low` end, so every schedule that decays the same way
computes it with the same floating-point operations."""
from __future__ import annotations

import math
from typing import Literal

# How a value falls from one level to another over a window: a half cosine (Loshchilov & Hutter 2017), a straight
# line, or 1-sqrt (Hägele et al. 2024, arXiv 2405.18392, §3: the cooldown shape that did best for WSD).
DecayShape = Literal["cosine", "linear", "1-sqrt"]
# How the infinite schedules fall from the peak to their constant (Ibrahim et al. 2024, §7.2).
CooldownShape = Literal["cosine", "inverse-sqrt"]


def decay(shape: DecayShape, progress: float, high: float, low: float) -> float:
    """`high` at progress 0, `low` at progress 1 (the caller clips progress to [0, 1])."""
    if shape == "cosine":
        # Operation for operation what the cosine schedule always computed: recorded losses stay bit-identical.
        return low + 0.5 * (high - low) * (1 + math.cos(math.pi * progress))
    if shape == "linear":
        return low + (high - low) * (1 - progress)
    return low + (high - low) * (1 - math.sqrt(progress))


def inverse_sqrt_cooldown(progress: float, high: float, low: float, alpha: float) -> float:
    """Ibrahim et al. 2024 (arXiv 2403.08763) §7.2, algorithms.md A.4: high + (low - high) h(u) / h(1) with
    h(u) = 1/sqrt(1 + alpha u) - 1; steep at first, then flattening into `low` (alpha sets how steep)."""
    def h(u: float) -> float:
        return 1 / math.sqrt(1 + alpha * u) - 1

    return high + (low - high) * h(progress) / h(1.0)


def exponential(progress: float, high: float, low: float) -> float:
    """high x (low / high)^progress: the anneal of the infinite schedules (algorithms.md A.4), normalised by its
    own window (not the (n - N_d) / (t_a + N_d) a third-party implementation writes). From 0 nothing can grow
    geometrically, so a `high` of 0 gives `low`."""
    return high * (low / high) ** progress if high > 0 else low
