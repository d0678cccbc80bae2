"""Elastic sizing in whole pipeline replicas.

Ray Train's elastic policy starts (and resizes to) as many workers as the cluster has resources for, any count
between `scaling.workers.min` and `.max`. A pipeline run needs a multiple of its stage count (world = stages x
data-parallel size), so its trainer counts workers the same way and then rounds down to whole replicas: with
3 workers' worth of CPUs and 2 stages it runs on 2, and grows to 4 once a fourth worker fits. The range's ends are
whole replicas (`PipelineConfig.check_job`), so the rounded count never leaves the range unless too few workers fit
at all, when Ray Train waits as it does for any elastic run.

Ray Train 2.60 builds its policy inside `DataParallelTrainer.fit` with no option to choose another; the trainer
below swaps it in where the controller is made, the one place the policy is passed.
"""
from __future__ import annotations

from typing import Any

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy


class WholeReplicas(ElasticScalingPolicy):
    """Ray Train's elastic policy with every worker count rounded down to a multiple of `stages`."""

    def __init__(self, scaling_config: Any, stages: int):
        super().__init__(scaling_config)
        self.stages = stages

    def _count_possible_workers(self, reserved_resources: Any) -> int:
        workers = super()._count_possible_workers(reserved_resources)
        return workers - workers % self.stages


class Trainer(TorchTrainer):
    """A TorchTrainer whose elastic runs size in whole replicas of `stages` workers."""

    def __init__(self, *args: Any, stages: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.stages = stages

    def _initialize_and_run_controller(self, **controller_init_kwargs: Any) -> Any:
        if self.stages > 1 and self.scaling_config.elasticity_enabled:
            controller_init_kwargs["scaling_policy"] = WholeReplicas(self.scaling_config, self.stages)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
