"""Tasks: what a model learns from which modalities, each a `Task` with its own `model:` section. One registry:
a new task is a module that registers a `Task` subclass, plus its import line below."""
from __future__ import annotations

from raypt.schema import ConfigError, tagged_union
from raypt.tasks import clm  # noqa: F401  (registers itself; the default, listed first)
from raypt.tasks import contrastive  # noqa: F401
from raypt.tasks import mae  # noqa: F401
from raypt.tasks import multimodal  # noqa: F401
from raypt.tasks.base import TASKS, Task, TaskConfig, register

# The type of the job's `model:` section: the config of the task its `task` key names, clm when it names none.
TaskConfigUnion = tagged_union({name: task.Config for name, task in TASKS.items()}, "task", default="clm")
MODALITIES = {name: task.modalities for name, task in TASKS.items()}  # the data each task takes


def get_task(name: str) -> type[Task]:
    if name not in TASKS:
        raise ConfigError(f"model.task: got {name!r}; allowed: {', '.join(TASKS)}")
    return TASKS[name]


def by_modality(manifests: list[dict]) -> dict[str, dict]:
    """The first dataset of each modality speaks for it (text sources share one tokenizer)."""
    from raypt.data.manifest import modality  # through storage, pyarrow: not at import (config imports this)

    out: dict[str, dict] = {}
    for m in manifests:
        out.setdefault(modality(m), m)
    return out



def job_plan(cfg, manifests: list[dict]):
    """A job's training plan (raypt.data.mix.MixPlan) outside a worker (preflight, plots): each source's tokens
    per sample from the job's task and the sources' manifests, in mix order, as the worker loop counts them."""
    from raypt.data.manifest import modality
    from raypt.data.mix import MixPlan

    task = get_task(cfg.model.task)(cfg, by_modality(manifests))
    tokens = [task.tokens_per_sample(modality(m)) for m in manifests]
    return MixPlan(cfg.data.stage_weights(), cfg.train.global_batch, tokens)


__all__ = ["MODALITIES", "TASKS", "Task", "TaskConfig", "TaskConfigUnion", "by_modality", "get_task", "job_plan", "register"]
