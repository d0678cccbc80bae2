"""Re-warm + re-decay: the schedule of a continued run (Gupta et al. 2023, arXiv 2308.04014, algorithms.md A.2)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from raypt.schedules.base import register
from raypt.schedules.decay import DecayToMin
from raypt.schedules.shapes import DecayShape


@register
class Rewarm(DecayToMin):
    """A continued run's schedule (Gupta et al. 2023, algorithms.md A.2): linear warm-up from `start_lr_ratio` x
    peak (the previous run's final value) back up to this run's peak, then `decay_shape` down to `min_lr_ratio` x
    peak at this run's last token. The defaults are the paper's: 1% warm-up, from and down to 0.1 x peak (which is
    where a previous run with the same peak and min_lr_ratio ended). With another peak, give the previous run's
    final LR / this peak, e.g. 0.05 for twice the peak of a run that ended at 0.1 x its own. The run starts at
    tokens 0 (where the continued run's tokens count from is the run's origin, not the schedule's)."""
    name: Literal["rewarm"] = "rewarm"
    warmup: float = Field(0.01, ge=0, lt=1, description="share of the run's tokens over which the value climbs "
                          "linearly from start_lr_ratio x peak to peak; 0 = jump to the peak")
    start_lr_ratio: float = Field(0.1, ge=0, le=1, description="where the warm-up starts, as a share of this run's "
                                  "peak: the previous run's final value / this peak (the paper's recommendation, "
                                  "continuous with the previous run), or 0 (what an iteration restart does)")
    decay_shape: DecayShape = Field("cosine", description="how the value falls after the warm-up: 'cosine' (the "
                                    "paper's), 'linear' or '1-sqrt'")

    def shape(self) -> DecayShape:
        return self.decay_shape
