"""The `pipeline:` section: a model's layers split over stages (raypt/engines/pipeline.py)."""
from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator

from raypt.schema import Section


class PipelineConfig(Section):
    """Pipeline parallelism: world size = stages x data-parallel size."""
    stages: int = Field(1, ge=1, description="pipeline stages, each holding consecutive layers; 1 = no pipeline "
                        "(ZeRO data parallelism); > 1 needs deepspeed.zero_stage 0 or 1")
    micro_batches: int = Field(4, ge=1, description="micro-batches per replica and step through the 1F1B "
                               "schedule; the idle share of each stage is (stages - 1) / (micro_batches + "
                               "stages - 1)")
    partition: str = Field("parameters", description="how layers are assigned to stages: parameters (balance "
                           "parameter counts), uniform (balance layer counts), or type:<regex> (balance the "
                           "layers whose class name matches, e.g. type:Block)")

    @field_validator("partition")
    @classmethod
    def _known(cls, value: str) -> str:
        if value in ("parameters", "uniform"):
            return value
        if value.startswith("type:"):
            try:
                re.compile(value[5:])
            except re.error as e:
                raise ValueError(f"pipeline.partition: {value!r} is not a valid regular expression ({e})") from None
            return value
        raise ValueError(f"pipeline.partition: {value!r} is not one of parameters, uniform, type:<regex>")

    def check_job(self, job: Any) -> None:
        """Refuse what the pipeline engine cannot run, naming the field (before any cluster work)."""
        if self.stages == 1:
            return
        from raypt.tasks import get_task

        if not get_task(job.model.task).pipelines:
            raise ValueError(f"pipeline.stages: {self.stages} needs a task with a pipeline form (clm); "
                             f"model.task {job.model.task} has none")
        if job.deepspeed.zero_stage > 1:
            raise ValueError(f"deepspeed.zero_stage: {job.deepspeed.zero_stage} cannot run with pipeline.stages "
                             f"{self.stages}: DeepSpeed's pipeline engine takes ZeRO 0 or 1 only")
        workers = job.scaling.workers
        ends = {"": workers} if isinstance(workers, int) else {".min": workers.min, ".max": workers.max}
        for end, size in ends.items():  # sizes between the ends that are not whole replicas are skipped
            if size % self.stages:
                raise ValueError(f"scaling.workers{end}: {size} is not a multiple of pipeline.stages "
                                 f"({self.stages}); a pipeline run's world sizes are whole replicas of "
                                 f"{self.stages} stages (raypt/elastic.py)")
        layers = job.model.num_layers + 3  # the embedding, the blocks, the final norm, the output projection
        if self.stages > layers:
            raise ValueError(f"pipeline.stages: {self.stages} is more than the model's {layers} pipeline layers "
                             f"(model.num_layers {job.model.num_layers} blocks, the embedding, the final norm and "
                             "the output projection)")
