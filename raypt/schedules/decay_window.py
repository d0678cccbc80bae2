"""A schedule whose last stretch, the decay window, falls to min_lr_ratio x peak: the base of `wsd` and
`inverse-sqrt`, which differ only in what the value does between the warm-up and that window."""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional

from pydantic import Field, ValidationInfo, field_validator

from raypt.schedules.base import span
from raypt.schedules.shapes import DecayShape, decay
from raypt.schedules.warmup import Warmup, fits_after_warmup


class DecayWindow(Warmup):
    """Warm-up, `main()` until the decay window, then `decay_shape` from wherever main() got to down to
    `min_lr_ratio` x peak at the run's last token (held after). The window ends the run, so a longer run moves it:
    this family is budget-bound. Given in tokens, warm-up and window may overlap in a short run; the window then
    starts where the warm-up ends."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the value at the end of the run, as a share of peak "
                                "(Hägele et al. 2024 cool down to 0)")
    decay_tokens: Optional[float] = Field(None, ge=0, description="the decay window's length in tokens; None = "
                                          "`decay`, a share of the run")
    decay: float = Field(0.2, ge=0, le=1, validate_default=True, description="share of the run's tokens, at its "
                         "end, over which the value decays to min_lr_ratio x peak; 0 = no decay (20% matched a "
                         "tuned cosine in Hägele et al. 2024, arXiv 2405.18392, §3)")
    decay_shape: DecayShape = Field("1-sqrt", description="how the value falls in the decay window: '1-sqrt' (best "
                                    "in Hägele et al. 2024), 'linear' or 'cosine'")

    @field_validator("decay")
    @classmethod
    def _fits_the_run(cls, decay: float, info: ValidationInfo) -> float:
        return fits_after_warmup("decay", decay, info)

    @abstractmethod
    def main(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        """The value between the warm-up and the decay window."""

    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        length = span(self.decay, self.decay_tokens, total_tokens)
        start = max(warm, total_tokens - length)
        if tokens < start or length <= 0:  # a window of 0: no decay at all, even past the run's end
            return self.main(tokens, warm, total_tokens, peak)
        window = total_tokens - start  # `length`, unless the warm-up ends later than the window would start
        progress = min(1.0, (tokens - start) / window) if window > 0 else 1.0
        high = self.main(start, warm, total_tokens, peak)  # continuous: the window starts where main() got to
        return decay(self.decay_shape, progress, high, self.min_lr_ratio * peak)
