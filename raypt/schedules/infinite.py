"""The infinite schedule: warm-up and cooldown once, then a constant with no end; an exponential anneal on a
branch when a finished model is wanted."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, ValidationInfo, field_validator

from raypt.schedules.base import refused, register, span
from raypt.schedules.shapes import CooldownShape, decay, exponential, inverse_sqrt_cooldown
from raypt.schedules.warmup import Warmup, fits_after_warmup


@register
class Infinite(Warmup):
    """Ibrahim et al. 2024 (arXiv 2403.08763) §7.2, algorithms.md A.4: linear warm-up to the peak, a cooldown
    (`cooldown_shape`) to `const_lr_ratio` x peak, then that constant for as long as training goes on, across
    datasets and runs: budget-free, a run given more steps (or a continued run) carries on at the constant. A
    continued run that starts directly in the constant phase sets warmup 0 and cooldown 0.

    The anneal: from `anneal_start_tokens` on, the value falls exponentially from where it was, const x
    (min / const)^((tokens - anneal_start_tokens) / anneal_tokens), reaching `min_lr_ratio` x peak after
    `anneal_tokens` and held there. A main run leaves both unset. An anneal branch is a copy of the main run's job
    with `anneal_start_tokens` = the tokens count of the (constant-phase) checkpoint it starts from and
    `anneal_tokens` = its own budget: up to that point its curve is the main run's, so it resumes that checkpoint
    exactly and only the anneal differs. The main run, and the next dataset, continue from the pre-anneal
    checkpoint, never the annealed one."""
    name: Literal["infinite"] = "infinite"
    cooldown_tokens: Optional[float] = Field(None, ge=0, description="the cooldown's length in tokens, which "
                                             "stays put when the run is made longer; None = `cooldown`, a share of "
                                             "the run")
    cooldown: float = Field(0.1, ge=0, lt=1, validate_default=True, description="share of the run's tokens, after "
                            "the warm-up, over which the value falls from the peak to const_lr_ratio x peak; 0 = "
                            "straight to the constant (a third-party implementation's default: it ends at 15% of "
                            "the run after a 5% warm-up)")
    cooldown_shape: CooldownShape = Field("cosine", description="how the cooldown falls: a half cosine, or an "
                                          "inverse square root (steep, then flat)")
    cooldown_alpha: float = Field(10.0, gt=0, description="steepness of the inverse-sqrt cooldown, 1/sqrt(1 + "
                                  "alpha u) - 1 over its progress u (the paper gives no value; a third-party "
                                  "implementation uses 10)")
    const_lr_ratio: float = Field(0.55, ge=0, le=1, description="the constant phase's value, as a share of peak "
                                  "(0.55: the paper's 1.65e-4 for a 3e-4 peak, halfway to min_lr_ratio)")
    min_lr_ratio: float = Field(0.1, gt=0, le=1, validate_default=True, description="where the anneal ends, as a "
                                "share of peak; above 0, since an exponential never reaches 0")
    anneal_start_tokens: Optional[float] = Field(None, ge=0, description="global tokens count at which an anneal "
                                                 "branch starts to anneal; None = no anneal (the main run)")
    anneal_tokens: Optional[float] = Field(None, gt=0, validate_default=True, description="tokens over which the "
                                           "anneal falls exponentially to min_lr_ratio x peak (a branch's budget)")

    @field_validator("cooldown")
    @classmethod
    def _fits_the_run(cls, cooldown: float, info: ValidationInfo) -> float:
        return fits_after_warmup("cooldown", cooldown, info)

    @field_validator("min_lr_ratio")
    @classmethod
    def _below_the_constant(cls, ratio: float, info: ValidationInfo) -> float:
        const = info.data.get("const_lr_ratio")
        if isinstance(const, float) and ratio > const:
            raise refused(f"the anneal goes down from const_lr_ratio ({const}) to min_lr_ratio, so it must be at "
                          "most const_lr_ratio")
        return ratio

    @field_validator("anneal_tokens")
    @classmethod
    def _with_its_start(cls, anneal: Optional[float], info: ValidationInfo) -> Optional[float]:
        if "anneal_start_tokens" not in info.data:  # invalid itself: its own error says so
            return anneal
        if (anneal is None) != (info.data["anneal_start_tokens"] is None):
            raise refused("anneal_start_tokens and anneal_tokens go together: an anneal branch sets both, a main "
                          "run neither")
        return anneal

    def after_warmup(self, tokens: float, warm: float, total_tokens: float, peak: float) -> float:
        cool, const = span(self.cooldown, self.cooldown_tokens, total_tokens), self.const_lr_ratio * peak
        if tokens >= warm + cool:
            return const
        u = (tokens - warm) / cool  # cool > 0 here: tokens >= warm
        if self.cooldown_shape == "cosine":
            return decay("cosine", u, peak, const)
        return inverse_sqrt_cooldown(u, peak, const, self.cooldown_alpha)

    def value(self, tokens: float, total_tokens: float, peak: float) -> float:
        start, length = self.anneal_start_tokens, self.anneal_tokens
        if start is None or length is None or tokens < start:
            return super().value(tokens, total_tokens, peak)
        # From the main curve's value where the anneal starts (the constant, for a branch off the constant phase).
        high = super().value(start, total_tokens, peak)
        return exponential(min(1.0, (tokens - start) / length), high, self.min_lr_ratio * peak)
