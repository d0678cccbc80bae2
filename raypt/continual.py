"""Where a run's schedule starts: where its own checkpoints left it (a resume; a run given more steps), at 0 on
another model's weights (`run.init_from`, a new run), or at a main run's constant phase (an anneal branch).

Schedules are pure functions of (tokens, the run's total tokens), so what changes the curve under a run is its
length: a run given more steps keeps its curve only where the schedule's value at the next step does not depend
on the length (constant; infinite once past its cooldown). A budget-bound schedule (cosine, WSD, ...) would jump,
so `check_extension` refuses it and points to a continued run.
"""
from __future__ import annotations

import math
from typing import Optional

from raypt import storage
from raypt.config import ConfigError, JobConfig
from raypt.data.mix import MixPlan
from raypt.tasks import job_plan


def train_plan(cfg: JobConfig) -> MixPlan:
    """The run's mix plan, whose `tokens_before(step)` is the global tokens count after `step` steps."""
    from raypt.data.manifest import read_manifest

    return job_plan(cfg, [read_manifest(s.path) for s in cfg.data.mix()])


def check_extension(cfg: JobConfig, checkpoint: str, saved: dict, step: int) -> None:
    """A run resumed from its own `checkpoint` (written at `step` by a job with the `saved` config) with another
    train.steps is refused when that changes the LR of the next step: the schedule lays its curve out over the
    run's length (cosine, WSD, ...)."""
    before = saved.get("train", {}).get("steps")
    if before is None or before == cfg.train.steps or step >= cfg.train.steps:
        return
    plan, schedule, peak = train_plan(cfg), cfg.train.schedule, cfg.train.lr
    tokens = plan.tokens_before(step + 1)
    old, new = (schedule.value(tokens, plan.tokens_before(n), peak) for n in (before, cfg.train.steps))
    if math.isclose(old, new, rel_tol=1e-9, abs_tol=1e-15):
        return
    raise ConfigError(
        f"train.steps: {cfg.train.steps}, but {checkpoint} was written by a run of {before} steps whose "
        f"train.schedule '{schedule.name}' is laid out over the run's length: at step {step + 1} its LR would jump "
        f"from {old:.3g} to {new:.3g}. To train on, start a new run from that checkpoint (a new run.name with "
        f"run.init_from={checkpoint} and train.schedule.name=rewarm); constant and infinite schedules extend")


def anneal_branch(run_folder: str, tokens: float, name: Optional[str] = None,
                  overrides: Optional[list[str]] = None) -> JobConfig:
    """The job of an anneal branch off a run on the infinite schedule: a fork of its newest checkpoint (which must
    be in the constant phase) into a run folder of its own, whose LR falls exponentially over `tokens` more
    tokens. The main run's folder is not touched, so it (and a next run's init_from) continues from the
    pre-anneal checkpoint. The branch pins the main run's warm-up and cooldown lengths in tokens: its longer
    length must not move them."""
    import yaml

    from raypt.checkpoint import latest_good, read_state
    from raypt.config import apply_override, from_dict, to_dict

    try:
        main = from_dict(yaml.safe_load(storage.read_text(storage.join(run_folder, "config.yaml"))))
    except FileNotFoundError:
        raise ConfigError(f"RUN: '{run_folder}' holds no config.yaml; expected a run folder such as runs/NAME"
                          ) from None
    schedule = main.train.schedule
    if schedule.name != "infinite" or schedule.anneal_tokens is not None:
        raise ConfigError(f"RUN: {run_folder} trains with train.schedule '{schedule.name}'"
                          f"{' (itself an anneal branch)' if schedule.name == 'infinite' else ''}; an anneal branch "
                          "starts from the constant phase of a main run on the infinite schedule")
    checkpoint = latest_good(run_folder, log=lambda m: None)
    if checkpoint is None:
        raise ConfigError(f"RUN: {run_folder} has no committed checkpoint to anneal from")
    state = read_state(checkpoint)[0]
    plan = train_plan(main)
    total = plan.tokens_before(main.train.steps)
    warm = schedule.warmup_end(total)
    cool = schedule.cooldown_tokens if schedule.cooldown_tokens is not None else schedule.cooldown * total
    if state.tokens_seen < warm + cool:
        raise ConfigError(f"RUN: its newest checkpoint {checkpoint} is at {state.tokens_seen} tokens, before the "
                          f"constant phase (from {warm + cool:.0f} tokens); train the main run further first")
    steps = state.step
    while plan.tokens_before(steps) - state.tokens_seen < tokens:
        steps += 1
    branch = {**main.train.schedule.model_dump(mode="json"), "warmup_tokens": warm, "cooldown_tokens": cool,
              "anneal_start_tokens": state.tokens_seen, "anneal_tokens": tokens}
    raw = to_dict(main)
    raw["run"].update(name=name or f"{main.run.name}-anneal-{state.step}", resume_from=checkpoint, init_from=None)
    raw["train"].update(steps=steps, schedule=branch)
    for override in overrides or []:
        apply_override(raw, override)
    return from_dict(raw)
