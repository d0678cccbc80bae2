"""`raypt tune`: validate every trial, size the concurrency to the cluster, run (or resume) the sweep with Tune,
print a line per trial state change and a table now and then, and write the results."""
from __future__ import annotations

import math
import os
import time
from typing import Any

import yaml
from ray.tune import Callback

from raypt import storage
from raypt.console import console
from raypt.schema import ConfigError
from raypt.tune.results import table, write_results
from raypt.tune.sweep import SweepConfig, check_trials
from raypt.tune.trial import run_trial, trial_name

READER_CPUS = 0.5  # a rank's data stream runs up to two read tasks of 0.25 CPU (raypt.data.stream)
TRIAL_CPUS = 0.01  # the trial function itself: it only waits on its run


def trial_cpus(job: Any) -> float:
    """CPUs one trial holds at its largest: its workers, their data readers, the trial function."""
    workers = job.scaling.workers if isinstance(job.scaling.workers, int) else job.scaling.workers.max
    return workers * (job.scaling.cpus_per_worker + READER_CPUS) + TRIAL_CPUS


def concurrency(sweep: SweepConfig, job: Any, cluster_cpus: float) -> int:
    """`auto`: as many trials as the cluster's CPUs hold (at least one); a number that cannot fit is an error."""
    need = trial_cpus(job)
    fits = math.floor(cluster_cpus / need + 1e-9)
    if fits < 1:
        raise ConfigError(f"concurrency: one trial needs {need:g} CPUs ({job.scaling.workers} workers x "
                          f"({job.scaling.cpus_per_worker:g} + {READER_CPUS:g} for data readers)), the cluster has "
                          f"{cluster_cpus:g}; lower scaling.workers or scaling.cpus_per_worker, or add nodes")
    if sweep.concurrency == "auto":
        return fits
    if sweep.concurrency > fits:
        raise ConfigError(f"concurrency: got {sweep.concurrency}; the cluster's {cluster_cpus:g} CPUs hold {fits} "
                          f"trial(s) of {need:g} CPUs each; use {fits} or auto")
    return sweep.concurrency


def scheduler(sweep: SweepConfig, job: Any) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        by_tokens = s.unit == "tokens"
        return ASHAScheduler(time_attr="tokens_seen" if by_tokens else "step", grace_period=s.grace_period,
                             max_t=(1 << 62) if by_tokens else job.train.steps, reduction_factor=s.reduction_factor)
    if s.name == "pbt":
        mutations = {k: d.mutation() for k, d in sweep.search.items()}
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.interval,
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability, synch=s.synch,
                                       hyperparam_mutations={"values": mutations})
    return FIFOScheduler()


class Progress(Callback):
    """One console line per trial state change, and the table at most every `every_s`."""

    def __init__(self, sweep: SweepConfig, every_s: float = 30.0):
        self.sweep, self.every_s, self.shown = sweep, every_s, 0.0

    def say(self, trial: Any, what: str) -> None:
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in trial.config.get("values", {}).items())
        print(f"[raypt] {trial_name(trial)} {what} ({values})", file=console(), flush=True)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(trial, "started")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self.say(trial, f"ended at step {last.get('step', '?')}, {self.sweep.metric} "
                        f"{last.get(self.sweep.metric, float('nan')):.4g}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(trial, "failed")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.say(trial, "failed; retrying from its latest checkpoint")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self.shown >= self.every_s:
            self.shown = time.monotonic()
            print(table(self.sweep), file=console(), flush=True)


def run_sweep(sweep: SweepConfig, job: dict) -> str:
    """Run the sweep to its end (or continue it: finished trials are kept, interrupted ones resume from their
    own checkpoints); returns the sweep folder."""
    import ray
    from ray import tune

    from raypt import config
    from raypt.driver import TRACKER_ENV, init_ray
    from raypt.metrics import trackers

    space = check_trials(sweep, job)  # before any cluster work: a bad sweep fails in seconds
    base = config.from_dict(job)
    trackers.check(base.run.trackers)
    for name in base.run.trackers:
        trackers.TRACKERS[name].prepare(sweep.name)
    os.environ.update(base.s3.env())
    init_ray(base.s3.env())
    at_once = concurrency(sweep, base, ray.cluster_resources().get("CPU", 0))
    storage.write_text(storage.join(sweep.folder, "sweep.yaml"),
                       yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, job=job, folder=sweep.folder, sweep=sweep.name,
                             env={k: v for k, v in os.environ.items() if k.startswith(TRACKER_ENV)},
                             follow=sweep.scheduler.name == "pbt", variants=sweep.variants), {"cpu": TRIAL_CPUS})
    fs, path = storage.resolve(sweep.folder)  # Tune's own state lives in the sweep folder too, under tune/
    if tune.Tuner.can_restore(f"{path}/tune", storage_filesystem=fs):
        print(f"[raypt] continuing sweep {sweep.name} from {sweep.folder}", file=console(), flush=True)
        tuner = tune.Tuner.restore(f"{path}/tune", trainable, resume_unfinished=True, storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable, param_space={"values": space},
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, scheduler=scheduler(sweep, base),
                                        num_samples=sweep.num_samples, max_concurrent_trials=at_once,
                                        trial_name_creator=trial_name, trial_dirname_creator=trial_name),
            run_config=tune.RunConfig(name="tune", storage_path=path, storage_filesystem=fs, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=sweep.trial_failures),
                                      callbacks=[Progress(sweep)]))
    grid = tuner.fit()
    write_results(sweep, job, {os.path.basename(r.path.rstrip("/")): r for r in grid})  # dirs are trial names
    return sweep.folder
