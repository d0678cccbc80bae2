"""The `fast:` section: switches that trade memory or set-up time for speed, each training to the same losses as
without it (tests/test_fast_paths.py)."""
from __future__ import annotations

from pydantic import Field

from raypt.schema import Section


class FastConfig(Section):
    """Fast paths of the step."""
    activation_checkpointing: bool = Field(False, description="keep only each transformer block's input and "
                                           "recompute its activations in the backward pass: activation memory "
                                           "for about a third more compute; a pipeline run checkpoints every block "
                                           "(DeepSpeed's activation_checkpoint_interval 1)")
