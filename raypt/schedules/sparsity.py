"""The sparsity a gradually pruned run reaches by each token (algorithms.md B.1): 0 until the pruning window,
rising to the final sparsity (the `peak`) at its end, held after. The hook that prunes (raypt/hooks/pruning.py)
reads it at its events, so a restart at any world size stays on the same curve."""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, ValidationInfo, field_validator

from raypt.schedules.base import Schedule, refused, register, span

# How density falls over the window, as sparsity at window progress p in [0, 1] for final sparsity S:
# geometric (Jin et al. 2025): density (1 - S)^p, the same share of the survivors pruned per unit of progress;
# cubic (Zhu & Gupta 2017): S (1 - (1 - p)^3), fast at first; linear: S p.
DensityForm = Literal["geometric", "cubic", "linear"]


@register
class SparsityRamp(Schedule):
    """Sparsity from 0 at the window's start to `peak` (sparsity.final) at its end, in the shape `form`."""
    name: Literal["sparsity"] = "sparsity"
    kind: ClassVar[str] = "sparsity"
    form: DensityForm = Field("geometric", description="how density falls in the window: geometric (Jin et al. "
                              "2025), cubic (Zhu & Gupta 2017) or linear in sparsity")
    start_tokens: Optional[float] = Field(None, ge=0, description="where pruning starts, in tokens; None = `start`, "
                                          "a share of the run")
    start: float = Field(0.25, ge=0, le=1, description="share of the run's tokens before pruning starts (25% was "
                         "near-optimal in Jin et al. 2025)")
    end_tokens: Optional[float] = Field(None, ge=0, description="where the final sparsity is reached, in tokens; "
                                        "None = `end`, a share of the run")
    end: float = Field(0.75, ge=0, le=1, description="share of the run's tokens by which the final sparsity is "
                       "reached (75% in Jin et al. 2025)")

    @field_validator("end_tokens", "end")
    @classmethod
    def after_start(cls, value: Optional[float], info: ValidationInfo) -> Optional[float]:
        """Tokens against tokens, shares against shares (when neither end is in tokens); a share against a token
        count waits for the run's length (`window`)."""
        if info.field_name == "end_tokens":
            start = info.data.get("start_tokens")
        else:
            start = info.data.get("start") if info.data.get("start_tokens") is None and \
                info.data.get("end_tokens") is None else None
        if value is not None and start is not None and value <= start:
            raise refused(f"must be after the start ({start:g}): pruning needs a window to ramp over")
        return value

    def window(self, total_tokens: float) -> tuple[float, float]:
        """The window's first and last token of this run."""
        first = span(self.start, self.start_tokens, total_tokens)
        last = span(self.end, self.end_tokens, total_tokens)
        if last <= first:
            raise ValueError(f"sparsity.schedule: the end ({last:g} tokens) is not after the start ({first:g} "
                             f"tokens) in a run of {total_tokens:g} tokens; give both as shares or both as tokens")
        return first, last

    def value(self, tokens: float, total_tokens: float, peak: float) -> float:
        first, last = self.window(total_tokens)
        p = min(1.0, max(0.0, (tokens - first) / (last - first)))
        if self.form == "geometric":
            return 1 - (1 - peak) ** p
        if self.form == "cubic":
            return peak * (1 - (1 - p) ** 3)
        return peak * p
