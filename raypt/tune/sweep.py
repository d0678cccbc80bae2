"""A sweep file: a base job, a search space over any dotted job key, the metric, the scheduler. Validated like a
job, and every trial's job with it (grid points and distribution bounds), before any cluster work."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from raypt.schema import ConfigError, Location, Section, tagged_union

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")


class Fifo(Section):
    """Run every trial to its end (the default; the only safe one when the metric first rises, as after a LR
    re-warm or a pruning step)."""
    name: Literal["fifo"] = "fifo"


class Asha(Section):
    """Asynchronous successive halving: at each rung keep the best 1/reduction_factor of the trials. A grace
    period shorter than a transient (a re-warm, a pruning window) stops the trials that would have won."""
    name: Literal["asha"] = "asha"
    grace_period: int = Field(ge=1, description="steps (or tokens, see unit) every trial runs before any is stopped")
    unit: Literal["steps", "tokens"] = Field("steps", description="what grace_period counts: optimizer steps or "
                                             "global tokens seen")
    reduction_factor: float = Field(2.0, gt=1, description="keep 1 / reduction_factor of the trials at each rung")


class Pbt(Section):
    """Population Based Training: every `interval` steps a trial in the bottom quantile continues from a trial in
    the top quantile's latest checkpoint, with the searched values perturbed or resampled."""
    name: Literal["pbt"] = "pbt"
    interval: int = Field(ge=1, description="steps between exploit/explore decisions; a multiple of "
                          "checkpoint.every works best (a trial continues from the donor's latest checkpoint)")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="share of trials that copy and that are copied")
    resample_probability: float = Field(0.25, ge=0, le=1, description="chance a value is drawn anew rather than "
                                        "perturbed by x0.8 or x1.2")
    synch: bool = Field(False, description="decide only when every trial has reached the interval (Ray's "
                        "synchronous PBT): no trial copies from one that is still starting, at the cost of waiting "
                        "for the slowest")


SCHEDULERS = {"fifo": Fifo, "asha": Asha, "pbt": Pbt}


class Distribution(Section):
    """One searched key: {grid: [values]}, {choice: [values]}, {uniform: [low, high]}, {loguniform: [low, high]}
    or {randint: [low, high]} (high excluded)."""
    kind: Literal[KINDS]
    args: list[Any]

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, value: Any) -> Any:
        if isinstance(value, dict) and "kind" not in value:
            if len(value) != 1 or next(iter(value)) not in KINDS:
                raise ValueError(f"got {value!r}; a distribution is one of {{{': [...]}, {'.join(KINDS)}: [...]}}")
            kind, args = next(iter(value.items()))
            return {"kind": kind, "args": args}
        if not isinstance(value, dict):  # a bare list is a grid
            return {"kind": "grid", "args": value} if isinstance(value, list) else value
        return value

    @model_validator(mode="after")
    def _args_fit(self) -> "Distribution":
        if self.kind in ("grid", "choice"):
            if not self.args:
                raise ValueError(f"{self.kind} needs at least one value")
            return self
        if len(self.args) != 2 or not all(isinstance(a, (int, float)) for a in self.args):
            raise ValueError(f"{self.kind} takes [low, high], got {self.args!r}")
        low, high = self.args
        if not low < high:
            raise ValueError(f"{self.kind}: low {low} must be below high {high}")
        if self.kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: low {low} must be > 0")
        if self.kind == "randint" and not all(isinstance(a, int) for a in self.args):
            raise ValueError(f"randint takes integers, got {self.args!r}")
        return self

    def corners(self) -> list[Any]:
        """The values whose validity stands for every value a trial may draw."""
        if self.kind in ("grid", "choice"):
            return list(self.args)
        return [self.args[0], self.args[1] - 1] if self.kind == "randint" else list(self.args)

    def mutation(self) -> Any:
        """What Population Based Training perturbs or resamples: the values of a grid or choice, else the range."""
        return list(self.args) if self.kind in ("grid", "choice") else self.space()

    def space(self) -> Any:
        from ray import tune

        low_high = self.args
        return {"grid": lambda: tune.grid_search(self.args), "choice": lambda: tune.choice(self.args),
                "uniform": lambda: tune.uniform(*low_high), "loguniform": lambda: tune.loguniform(*low_high),
                "randint": lambda: tune.randint(*low_high)}[self.kind]()


class SweepConfig(Section):
    """A sweep: trials of one base job, each a distributed, fault-tolerant run of its own."""
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the sweep folder; the same name "
                      "resumes the sweep")
    base: str = Field(description="the job file every trial starts from (relative to the sweep file)")
    overrides: list[str] = Field(default_factory=list, description="dotted job overrides for every trial")
    search: dict[str, Distribution] = Field(description="dotted job key -> distribution; any job field, a whole "
                                            "schedule or a list of data sources included")
    variants: dict[str, list[str]] = Field(default_factory=dict, description="named sets of dotted job overrides, "
                                           "crossed with `search`: each trial runs one (a `variant` column in the "
                                           "table). For arms that differ in several keys at once: a schedule with "
                                           "its own peak LR, a data mix with replay; {} = none")
    num_samples: int = Field(1, ge=1, description="samples of the space (each grid point is run num_samples times)")
    metric: str = Field("val_loss", description="a metric every run reports, e.g. val_loss")
    mode: Literal["min", "max"] = Field("min", description="whether the metric is better low or high")
    scheduler: tagged_union(SCHEDULERS, "name", default="fifo") = Field(  # type: ignore[valid-type]
        default_factory=Fifo, description="fifo (run all), asha (stop the worst early) or pbt")
    concurrency: Union[Literal["auto"], int] = Field("auto", description="trials at once; auto = as many as the "
                                                     "cluster's CPUs hold (workers, data readers, the trial itself)")
    trial_failures: int = Field(0, ge=0, description="times a failed trial is retried (each retry resumes from "
                                "the trial's own latest checkpoint)")
    storage: Location = Field("sweeps", validate_default=True, description="folder or s3:// URI holding the sweep "
                              "folder: its trials' run folders and results")

    @field_validator("variants")
    @classmethod
    def _named(cls, variants: dict[str, list[str]]) -> dict[str, list[str]]:
        bad = [n for n in variants if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", n)]
        if bad:
            raise ValueError(f"got the name {bad[0]!r}; variant names are letters, digits and _.+- (they name "
                             "trials in the table)")
        return variants

    def space(self) -> dict[str, Distribution]:
        """The searched keys, with `variant` (a grid over the variants' names) when there are variants."""
        variant = {"variant": Distribution(kind="grid", args=list(self.variants))} if self.variants else {}
        return {**self.search, **variant}

    @field_validator("concurrency")
    @classmethod
    def _positive(cls, value: Union[str, int]) -> Union[str, int]:
        if isinstance(value, int) and value < 1:
            raise ValueError(f"got {value}; at least 1 trial at a time, or auto")
        return value

    @property
    def folder(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.name}"


def set_key(raw: dict, key: str, value: Any) -> None:
    """`value` (data, not text) at a dotted job key."""
    from raypt.config import apply_override

    apply_override(raw, f"{key}={json.dumps(value)}")


def trial_raw(job: dict, values: dict, variants: dict[str, list[str]]) -> dict:
    """A trial's job dict: the base job, its variant's overrides (if any), then the searched values."""
    from raypt.config import apply_override

    raw = json.loads(json.dumps(job))
    for override in variants.get(values.get("variant", ""), []):
        apply_override(raw, override)
    for key, value in values.items():
        if key != "variant":
            set_key(raw, key, value)
    return raw


def load_sweep(path: str, overrides: Optional[list[str]] = None) -> tuple[SweepConfig, dict]:
    """The sweep and its base job as a validated dict (paths absolute); `overrides` are job overrides, or
    sweep-file settings when prefixed with `sweep.` (e.g. sweep.concurrency=1)."""
    from raypt.config.load import read_mapping

    p = Path(path)
    raw = read_mapping(p, "sweep file")
    raw.setdefault("name", p.stem)
    job_overrides = []
    for o in overrides or []:
        if o.startswith("sweep."):
            from raypt.config import apply_override

            apply_override(raw, o[len("sweep."):])
        else:
            job_overrides.append(o)
    if isinstance(raw.get("base"), str):
        raw["base"] = str((p.parent / raw["base"]).resolve())
    try:
        sweep = SweepConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(x) for x in err['loc'] if not str(x).startswith('function-'))}: "
                 f"{str(err['msg']).removeprefix('Value error, ')}" for err in e.errors()]
        raise ConfigError("invalid sweep:\n  " + "\n  ".join(dict.fromkeys(lines))) from None
    from raypt import config

    job = config.to_dict(config.load(sweep.base, [*sweep.overrides, *job_overrides]))
    return sweep, job


def check_trials(sweep: SweepConfig, job: dict) -> dict[str, Any]:
    """Every trial's job validates: each grid point, each choice and both bounds of each range (with the other keys
    at their first value). Returns the search space, each grid/choice value as its job resolved it (paths made
    absolute here, not in a trial's working directory)."""
    from raypt import config

    def trial_job(values: dict) -> config.JobConfig:
        return config.from_dict(trial_raw(job, values, sweep.variants))

    space = sweep.space()
    firsts = {k: d.corners()[0] for k, d in space.items()}
    resolved: dict[str, list] = {}
    for key, dist in space.items():
        for value in dist.corners():
            try:
                cfg = trial_job({**firsts, key: value})
            except ConfigError as e:
                where = f"variants.{value}" if key == "variant" else f"search.{key}: the value {value!r}"
                raise ConfigError(f"{where} makes an invalid job:\n  {e}") from None
            resolved.setdefault(key, []).append(value if key == "variant" else value_at(config.to_dict(cfg), key))
    grids = [k for k, d in space.items() if d.kind == "grid"]
    for point in itertools.product(*(space[k].args for k in grids)):  # grid values must also combine
        try:
            trial_job({**firsts, **dict(zip(grids, point))})
        except ConfigError as e:
            raise ConfigError(f"search: the grid point {dict(zip(grids, point))} makes an invalid job:\n"
                              f"  {e}") from None
    check_metric(sweep, trial_job(firsts))
    return {k: Distribution(kind=d.kind, args=resolved[k]).space() if d.kind in ("grid", "choice") else d.space()
            for k, d in space.items()}


def value_at(tree: Any, key: str) -> Any:
    """The value at a dotted key of a job dict, None where the path does not exist."""
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_metric(sweep: SweepConfig, cfg: Any) -> None:
    """The sweep's metric must be one every trial reports (Tune refuses a result that lacks it)."""
    from raypt.engines import select
    from raypt.hooks import standard_hooks
    from raypt.metrics import CORE, source_losses
    from raypt.tasks import get_task

    task = get_task(cfg.model.task)(cfg, {})  # what it declares follows the job (per-head losses), not the data
    declared = [*CORE, *source_losses(cfg.data.evaluated()), *task.metrics, *select(cfg).metrics,
                *standard_hooks(cfg, None, "", 0, task.hooks()).metrics]
    names = sorted({m.name for m in declared})
    if sweep.metric not in names:
        raise ConfigError(f"metric: got {sweep.metric!r}, which no run of this job reports; runs report "
                          f"{', '.join(names)}")
