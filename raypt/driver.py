"""Driver side, in three steps that a CLI run and a Tune trial share:

  start(cfg)   attach to or start Ray, refuse resuming another job's checkpoints, write the resolved config
  build(cfg)   the TorchTrainer of the validated config (plus optional sink, callbacks, hooks) and its data feed
  finish(cfg)  export the latest good checkpoint, write the summary, mirror the run files to storage

`train(cfg)` runs all three and follows progress on the console.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from typing import Any, Optional

import ray
import yaml

from raypt import storage
from raypt.config import ConfigError, JobConfig, to_dict, trajectory_diff
from raypt.console import console
from raypt.continual import check_extension
from raypt.hooks.preemption import PREEMPTION_WATCHER

# The embedded cluster exists only to train: workers run at normal priority (Ray's default niceness of 15
# lets its own daemons preempt the ranks, which then wait on each other in collectives). An attached cluster
# keeps its own settings. A one-node embedded cluster is never drained by an autoscaler, so Ray Train's
# preemption watcher would only be one more process waking every 10 ms on the ranks' cores.
EMBEDDED_ENV = {"RAY_worker_niceness": "0", "RAY_TRAIN_METRICS_ENABLED": "0", PREEMPTION_WATCHER: "0"}
TRACKER_ENV = ("MLFLOW_", "WANDB_")  # what the sink's trackers read from the driver's environment
CONFIG_FILE = "config.yaml"  # the resolved job, in the run folder: export, generate and continued runs read it


class TrainingFailed(RuntimeError):
    pass


def init_ray(env: dict[str, str] | None = None) -> None:
    """RAY_ADDRESS when set (a cluster or `ray job submit`), else an embedded local cluster. `env` (the job's
    S3 settings) reaches every process of the job: through the runtime env on a cluster, inherited when embedded."""
    if ray.is_initialized():
        return
    quiet = ray.LoggingConfig(log_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_config=quiet, runtime_env={"env_vars": env} if env else None)
        return
    os.environ.update(env or {})
    for key, value in EMBEDDED_ENV.items():
        os.environ.setdefault(key, value)
    # Logical CPUs beyond the cores leave room for the data feed's read tasks beside the train workers.
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), logging_config=quiet)


def run_dir(cfg: JobConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def local_dir(cfg: JobConfig) -> str:
    """Where metrics, TensorBoard, summary and export are written; for a run on object storage, metrics and tracker
    files are mirrored there at every checkpoint (see Sink), and the whole folder at the end."""
    folder = run_dir(cfg)
    return folder if "://" not in folder else os.path.abspath(os.path.join("runs", cfg.run.name))


def use_gpu(cfg: JobConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def check_resumable(cfg: JobConfig) -> Optional[str]:
    """The checkpoint an auto-resume would continue from, refused when another job wrote it (see
    `JobConfig.trajectory` for what counts as the same job) or when another train.steps would bend its schedule
    (`continual.check_extension`). Checkpoints from before the index carry only a
    digest of another scheme, so they resume as before."""
    from raypt.checkpoint import latest_good, read_state

    latest = latest_good(run_dir(cfg), log=lambda m: None)
    if latest is None:
        return None
    state, body = read_state(latest)
    saved = body.get("trajectory")
    changed = trajectory_diff(saved, cfg.trajectory()) if saved is not None else []
    if changed:
        name = latest.rsplit("/", 1)[-1]
        raise ConfigError(
            f"run.name: run folder {run_dir(cfg)} holds checkpoints of another job ({name} differs in "
            f"{', '.join(changed)}); to fork from it, give the run a new name and set "
            f"run.resume_from={latest}; to resume it, run it with its own settings "
            f"({storage.join(run_dir(cfg), CONFIG_FILE)})")
    check_extension(cfg, latest, body.get("config") or {}, state.step)
    return latest


def start(cfg: JobConfig, sink: bool = True) -> Optional[Any]:
    """Before any training: Ray up, the resume refused if it would mix two jobs, the resolved config written.
    Returns the run's metrics sink actor (beside this driver), or None without one."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypt.metrics import trackers
    from raypt.metrics.sink import MetricsSink

    os.environ.update(cfg.s3.env())  # this process's S3 access; init_ray hands the same to every Ray process
    trackers.check(cfg.run.trackers)
    check_resumable(cfg)
    init_ray(cfg.s3.env())
    storage.write_text(storage.join(run_dir(cfg), CONFIG_FILE), yaml.safe_dump(to_dict(cfg), sort_keys=False))
    if not sink:
        return None
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    # Trackers read their settings and credentials from the environment of this process, never from the job.
    env = {k: v for k, v in os.environ.items() if k.startswith(TRACKER_ENV)}
    remote = run_dir(cfg) if local_dir(cfg) != run_dir(cfg) else None
    actor = MetricsSink.options(scheduling_strategy=here, runtime_env={"env_vars": env} if env else None).remote(
        local_dir(cfg), trackers=cfg.run.trackers, run_name=cfg.run.name, group=cfg.run.group, config=to_dict(cfg),
        remote=remote)
    ray.get(actor.poll.remote())  # a tracker that cannot start (no server, no credentials) fails here, not mid-run
    return actor


def build(cfg: JobConfig, sink: Optional[Any] = None, callbacks: Optional[list] = None, hooks: tuple = ()):
    """The TorchTrainer of a job. A Tune function trainable calls this with `callbacks=[TuneReportCallback()]`:
    rank 0 reports to Ray at every evaluation and every checkpoint. `hooks` are extra loop hooks (or
    `(hook, every)` pairs), pickled to the workers. The run's data feed starts here, beside this driver, which
    owns it: every worker group of the run reads through it (raypt/data/feed.py); so does the registry of in-memory
    snapshots (raypt/checkpoint/memory.py), so that they outlive the worker groups too."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from raypt.checkpoint.memory import start_snapshots
    from raypt.data.feed import start_feed
    from raypt.elastic import Trainer
    from raypt.hooks.faults import reader_drill
    from raypt.loop import train_loop

    gpu = use_gpu(cfg)
    if cfg.fast.pin_memory and not gpu:
        raise ConfigError("fast.pin_memory: true needs GPU workers; the cluster has no GPU (scaling.use_gpu auto)")
    w, f = cfg.scaling.workers, cfg.failure
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    elastic = {} if isinstance(w, int) else {"elastic_resize_monitor_interval_s": cfg.scaling.resize_interval_s}
    fs, base = storage.resolve(cfg.run.storage)
    return Trainer(
        train_loop, stages=cfg.pipeline.stages,
        train_loop_config={"job": to_dict(cfg), "sink": sink, "hooks": list(hooks),
                           "feed": start_feed(cfg.data.reader_cpus, reader_drill(cfg.faults, run_dir(cfg))),
                           "snapshots": start_snapshots(cfg.checkpoint.memory_every, cfg.checkpoint.memory_limit_gb)},
        # A collective waits at most as long as a step may take (the step watchdog's limit, raypt/hooks/watchdog.py).
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo", timeout_s=math.ceil(f.step_timeout_s)),
        scaling_config=ScalingConfig(num_workers=w if isinstance(w, int) else (w.min, w.max), use_gpu=gpu,
                                     resources_per_worker=resources, **elastic),
        run_config=RunConfig(name=cfg.run.name, storage_path=base, storage_filesystem=fs, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=f.max_failures,
                                                          max_preemption_failures=f.max_preemption_failures)),
    )


def follow(sink, fit_thread: threading.Thread, total: int) -> None:
    """raypt's lines and a progress bar on the console until the fit ends."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=None, file=console())
    while True:
        latest, events = ray.get(sink.poll.remote())
        for e in events:
            bar.write(e, file=console())
        if "step" in latest:
            bar.n = latest["step"]
            shown = ("loss", "val_loss", "tokens_per_s", "mfu", "hfu")
            post = {k: f"{latest[k]:.4g}" for k in shown if latest.get(k)}
            bar.set_postfix(post, refresh=False)
            bar.refresh()
        if not fit_thread.is_alive():
            break
        time.sleep(1.0)  # each poll wakes the sink actor, which shares the ranks' cores
    bar.close()


def summarize(records: list[dict], wall_s: float) -> dict:
    steps = [r for r in records if r.get("loss") is not None]
    vals = [r for r in records if r.get("val_loss") is not None]
    timed = steps[1:] or steps  # the first step carries start-up costs
    step_time = sum(r["step_time_s"] for r in timed)
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "final_loss": steps[-1]["loss"] if steps else None,
        "initial_val_loss": vals[0]["val_loss"] if vals else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        **{f"final_{k}": v for k, v in (vals[-1] if vals else {}).items() if k.startswith("val_loss/")},  # per source
        "tokens_seen": steps[-1]["tokens_seen"] if steps else 0,
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed) if timed else None,
        **{k: sum(r[k] for r in timed) / len(timed) if timed and k in timed[0] else None for k in ("mfu", "hfu")},
        "data_wait_fraction": sum(r["data_wait_s"] for r in timed) / step_time if step_time else None,
        **{k: steps[-1][k] for k in ("density", "nonzero_params", "n_avg") if steps and k in steps[-1]},
        "wall_s": wall_s,
    }


def finish(cfg: JobConfig, error: Optional[Exception], wall_s: float, export: bool = True) -> str:
    """Export the latest good checkpoint (unless told not to: sweep trials), write summary.json, mirror the run
    files; the run folder."""
    from raypt.checkpoint import Reader, latest_good, list_checkpoints, local_copy
    from raypt.data.manifest import bad_records, read_manifest
    from raypt.export import export as export_to
    from raypt.hooks.pruning import Pruning, sparsity_by_tensor
    from raypt.metrics.sink import read_metrics

    folder, local = run_dir(cfg), local_dir(cfg)
    # A fork from a checkpoint at (or past) its last step trains nothing: the checkpoint it forked from is its end.
    latest = latest_good(folder, log=lambda m: None) or cfg.run.resume_from
    if error is not None:
        kept = ", ".join(c.rsplit("/", 1)[-1] for c in list_checkpoints(folder)) or "none"
        failed = TrainingFailed(
            f"run {cfg.run.name} failed (failure.max_failures={cfg.failure.max_failures} restarts allowed): "
            f"{error}\ncheckpoints kept: {kept}; run the same job again to resume from "
            f"{latest.rsplit('/', 1)[-1] if latest else 'the start'}\nrun folder: {folder}")
        storage.write_text(storage.join(folder, "error.txt"), f"{failed}\n")  # beside the checkpoints, for later
        raise failed
    if latest is None:
        raise TrainingFailed(f"run {cfg.run.name} ended without a good checkpoint; run folder: {folder}")
    pruned = {}
    if export or cfg.sparsity.final > 0:
        with local_copy(latest) as ckpt:
            if export:
                export_to(ckpt, cfg, os.path.join(local, "export"))
            if cfg.sparsity.final > 0:  # each pruned tensor's final share of zeros, from the checkpoint's masks
                pruned = {"sparsity_by_tensor": sparsity_by_tensor(Reader(ckpt).hook_tensors(Pruning.name))}
    sources = cfg.data.mix()
    skipped = bad_records([s.name for s in sources], [read_manifest(s.path) for s in sources], detail=True)
    summary = {"run": cfg.run.name, **summarize(read_metrics(local), wall_s), "checkpoint": latest,
               **({"export": storage.join(folder, "export")} if export else {}), **skipped, **pruned}
    with open(os.path.join(local, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if local != folder:
        storage.copy_tree(local, folder)
    return folder


def train(cfg: JobConfig, hooks: tuple = ()) -> str:
    """Run (or resume) the job to its last step, export it, and return the run folder."""
    sink = start(cfg)
    trainer = build(cfg, sink, hooks=hooks)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # surfaced by finish with the run folder
            outcome["error"] = e

    began = time.time()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    follow(sink, thread, cfg.train.steps)
    thread.join()
    ray.get(sink.close.remote())
    return finish(cfg, outcome.get("error"), time.time() - began)
