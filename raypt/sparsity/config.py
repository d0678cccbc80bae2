"""The `sparsity:` section of a job. Light (pydantic only): the job config imports it."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from raypt.schedules.sparsity import SparsityRamp
from raypt.schema import Section


class SparsityConfig(Section):
    """Gradual magnitude pruning to a final sparsity (Jin et al. 2025, algorithms.md B); final = 0 is a dense run."""
    final: float = Field(0.0, ge=0, lt=1, description="share of the prunable weights that are zero at the end; "
                         "0 = a dense run (no masks, no cost)")
    every: int = Field(100, ge=1, description="optimizer steps between pruning events in the window (the first "
                       "step at or past its end prunes to the final sparsity)")
    scope: Literal["global", "per_layer"] = Field("global", description="global = one magnitude threshold across "
                                                   "every prunable tensor (the paper's); per_layer = each tensor "
                                                   "pruned to the same sparsity on its own")
    prune_head: bool = Field(False, description="prune the output head too (a head tied to the input embedding "
                             "is never pruned)")
    exclude: list[str] = Field([], description="parameter-name substrings kept dense, e.g. ['attn']; each must "
                               "match a prunable weight (checked before the run)")
    schedule: Optional[SparsityRamp] = Field(None, description="the sparsity as a function of global tokens "
                                             "seen: its window and density form (the defaults when final > 0)")

    @model_validator(mode="before")
    @classmethod
    def _ramp_when_pruning(cls, data: Any) -> Any:
        # A dense run has no schedule field, so its config (and `raypt plot schedule`) shows no sparsity curve.
        if isinstance(data, dict) and (data.get("final") or 0) > 0 and data.get("schedule") is None:
            return {**data, "schedule": {}}
        return data
