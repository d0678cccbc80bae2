"""The linear warmup that LR schedules start with; a subclass says what follows it."""
from __future__ import annotations

from abc import abstractmethod

from pydantic import Field

from raypt.schedules.base import Schedule


class Warmup(Schedule):
    warmup: float = Field(0.05, ge=0, lt=1, description="share of the run's tokens over which the value ramps "
                          "linearly from 0 to peak; 0 = start at peak")

    def value(self, tokens: float, total_tokens: float, peak: float) -> float:
        warm = self.warmup * total_tokens
        if tokens < warm:
            return peak * tokens / warm
        return self.after_warmup(tokens, warm, total_tokens, peak)

    @abstractmethod
    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        """The value once `warm` tokens (the end of the warmup) are behind."""
