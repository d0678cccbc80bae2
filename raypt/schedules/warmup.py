"""The linear warmup that LR schedules start with; a subclass says what follows it."""
from __future__ import annotations

from abc import abstractmethod
from typing import Optional

from pydantic import Field, ValidationInfo

from raypt.schedules.base import Schedule, refused, span


class Warmup(Schedule):
    warmup_tokens: Optional[float] = Field(None, ge=0, description="the warm-up's length in tokens, which stays "
                                           "put when the run is made longer; None = `warmup`, a share of the run")
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the run's tokens over which the value ramps "
                          "linearly from start_lr_ratio x peak to peak; 0 = start at peak")
    start_lr_ratio: float = Field(0.0, ge=0, le=1, description="where the warm-up starts, as a share of peak: 0 "
                                  "for a fresh run; for a continued run re-warmed from where the previous run "
                                  "ended, that run's final value / this run's peak (Gupta et al. 2023, "
                                  "algorithms.md A.2)")

    def warmup_end(self, total_tokens: float) -> float:
        return span(self.warmup, self.warmup_tokens, total_tokens)

    def value(self, tokens: float, total_tokens: float, peak: float) -> float:
        warm = self.warmup_end(total_tokens)
        if tokens < warm:
            # With start_lr_ratio 0 this is peak * tokens / warm to the last bit (0.0 + x == x, peak - 0.0 == peak):
            # runs recorded before re-warming existed keep their exact values.
            start = self.start_lr_ratio * peak
            return start + (peak - start) * tokens / warm
        return self.after_warmup(tokens, warm, total_tokens, peak)

    @abstractmethod
    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        """The value once `warm` tokens (the end of the warmup) are behind."""


def fits_after_warmup(phase: str, share: float, info: ValidationInfo) -> float:
    """The check of a field validator on the share `phase` of a later phase: refused when it and the warm-up, both
    given as shares, add up to more than the run. Token counts cannot be checked before the run's length is known;
    the fields declared above the validated one are in info.data when valid, which is why each `*_tokens` override
    is declared before its share."""
    warmup = info.data.get("warmup")
    by_share = info.data.get("warmup_tokens") is None and info.data.get(f"{phase}_tokens") is None
    if by_share and isinstance(warmup, float) and warmup + share > 1:
        raise refused(f"warmup ({warmup}) + {phase} ({share}) must be at most 1: the shares add up to more than "
                      "the whole run")
    return share
