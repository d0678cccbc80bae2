"""The `fast:` section: switches that trade memory or set-up time for speed, each training to the same losses as
without it (tests/test_fast_paths.py). Two fast paths live where their subject is: bf16 with fp32 masters is
`deepspeed.precision` (auto: bf16 on GPUs that have it), and every task's attention is torch's SDPA (flash kernels
where the GPU has them)."""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from raypt.schema import Section


class FastConfig(Section):
    """Fast paths of the step."""
    activation_checkpointing: bool = Field(False, description="keep only each transformer block's input and "
                                           "recompute its activations in the backward pass: activation memory "
                                           "for about a third more compute; a pipeline run checkpoints every block "
                                           "(DeepSpeed's activation_checkpoint_interval 1)")
    compile: bool = Field(False, description="torch.compile each transformer block in place (parameter names, and "
                          "so checkpoints, unchanged): fused kernels for a compile at the first steps; not with "
                          "ZeRO-3, whose parameter gathering runs in hooks inside the blocks")
    pin_memory: bool = Field(False, description="copy each batch to the GPU from pinned host memory, non-blocking, "
                             "so the copy overlaps the step; GPU workers only")
    fused_optimizer: Optional[bool] = Field(None, description="torch's fused AdamW (one kernel per step for all "
                                            "parameters); null = on CUDA; not with deepspeed.offload, whose "
                                            "optimizer is DeepSpeed's CPU Adam")

    def check_job(self, job: Any) -> None:
        """Refuse switches that cannot work with the rest of the job, naming the fields (before any cluster
        work); `pin_memory` on a cluster without GPUs is refused where the driver sees the cluster."""
        if self.compile and job.deepspeed.zero_stage == 3 and job.pipeline.stages == 1:
            raise ValueError("fast.compile: true cannot run with deepspeed.zero_stage 3: ZeRO-3 gathers each "
                             "layer's parameters in module hooks inside the blocks, which torch.compile does not "
                             "trace; use zero_stage 0-2")
        if self.pin_memory and job.scaling.use_gpu is False:
            raise ValueError("fast.pin_memory: true needs GPU workers; scaling.use_gpu is false")
        if self.fused_optimizer and job.deepspeed.offload != "none":
            raise ValueError(f"fast.fused_optimizer: true cannot run with deepspeed.offload {job.deepspeed.offload}: "
                             "an offloaded optimizer is DeepSpeed's CPU Adam; leave fused_optimizer null")
