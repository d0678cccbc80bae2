"""Driver side: attach to or start Ray, build the TorchTrainer from the validated config alone, follow progress."""
from __future__ import annotations

import json
import os
import threading
import time

import ray

from raypt import storage
from raypt.config import JobConfig, to_dict

# The embedded cluster exists only to train: workers run at normal priority (Ray's default niceness of 15
# lets its own daemons preempt the ranks, which then wait on each other in collectives). An attached cluster
# keeps its own settings. A one-node embedded cluster is never drained by an autoscaler, so Ray Train's
# preemption watcher would only be one more process waking every 10 ms on the ranks' cores.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
EMBEDDED_ENV = {"RAY_worker_niceness": "0", "RAY_TRAIN_METRICS_ENABLED": "0", PREEMPTION_WATCHER: "0"}


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
    # Logical CPUs beyond the cores leave room for Ray Data's read tasks beside the train workers.
    ray.init(address="local", num_cpus=max(4, 2 * (os.cpu_count() or 1)), logging_config=quiet)


def run_dir(cfg: JobConfig) -> str:
    return storage.join(cfg.run.storage, cfg.run.name)


def local_dir(cfg: JobConfig) -> str:
    """Where metrics, TensorBoard, summary and export are written; mirrored to object storage at the end."""
    folder = run_dir(cfg)
    return folder if "://" not in folder else os.path.abspath(os.path.join("runs", cfg.run.name))


def use_gpu(cfg: JobConfig) -> bool:
    if cfg.scaling.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.scaling.use_gpu)


def build_trainer(cfg: JobConfig, sink=None, callbacks: list | None = None):
    """A pure function of the validated config (plus where metrics go), so Tune trials can call it too."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raypt.loop import train_loop

    gpu = use_gpu(cfg)
    w, f = cfg.scaling.workers, cfg.failure
    resources = {"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if gpu else {})}
    elastic = {} if isinstance(w, int) else {"elastic_resize_monitor_interval_s": cfg.scaling.resize_interval_s}
    fs, base = storage.resolve(cfg.run.storage)
    return TorchTrainer(
        train_loop,
        train_loop_config={"job": to_dict(cfg), "sink": sink},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=w if isinstance(w, int) else (w.min, w.max), use_gpu=gpu,
                                     resources_per_worker=resources, **elastic),
        run_config=RunConfig(name=cfg.run.name, storage_path=base, storage_filesystem=fs, callbacks=callbacks,
                             failure_config=FailureConfig(max_failures=f.max_failures,
                                                          max_preemption_failures=f.max_preemption_failures)),
    )


def _follow(sink, fit_thread: threading.Thread, total: int) -> None:
    from tqdm import tqdm

    bar = tqdm(total=total, unit="step", dynamic_ncols=True, disable=None)
    while True:
        latest, events = ray.get(sink.poll.remote())
        for e in events:
            bar.write(e)
        if "step" in latest:
            bar.n = latest["step"]
            post = {k: f"{latest[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s", "mfu") if latest.get(k)}
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
        "tokens_seen": steps[-1]["tokens_seen"] if steps else 0,
        "tokens_per_s": sum(r["tokens_per_s"] for r in timed) / len(timed) if timed else None,
        "mfu": sum(r["mfu"] for r in timed) / len(timed) if timed else None,
        "data_wait_fraction": sum(r["data_wait_s"] for r in timed) / step_time if step_time else None,
        "wall_s": wall_s,
    }


def bad_records(cfg: JobConfig) -> dict:
    """What `data prepare` left out of each source, by name and reason, for the run's summary."""
    from raypt.data.manifest import read_manifest

    skipped = {s.name: read_manifest(s.path).get("bad_records", {}) for s in cfg.data.mix()}
    return {"bad_records": {k: v for k, v in skipped.items() if v.get("count")}} if any(
        v.get("count") for v in skipped.values()) else {}


def train(cfg: JobConfig) -> str:
    """Run (or resume) the job to its last step, export it, and return the run folder."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from raypt.checkpoint import latest_good, list_checkpoints, local_copy
    from raypt.export import export
    from raypt.metrics import MetricsSink, read_metrics

    init_ray(cfg.s3.env())
    folder, local = run_dir(cfg), local_dir(cfg)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    sink = MetricsSink.options(scheduling_strategy=here).remote(local)
    trainer = build_trainer(cfg, sink)
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as e:  # surfaced below with the run folder
            outcome["error"] = e

    start = time.time()
    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    _follow(sink, thread, cfg.train.steps)
    thread.join()
    ray.get(sink.close.remote())
    latest = latest_good(folder, log=lambda m: None)
    if "error" in outcome:
        kept = ", ".join(c.rsplit("/", 1)[-1] for c in list_checkpoints(folder)) or "none"
        raise TrainingFailed(
            f"run {cfg.run.name} failed (failure.max_failures={cfg.failure.max_failures} restarts allowed): "
            f"{outcome['error']}\ncheckpoints kept: {kept}; run the same job again to resume from "
            f"{latest.rsplit('/', 1)[-1] if latest else 'the start'}\nrun folder: {folder}")
    if latest is None:
        raise TrainingFailed(f"run {cfg.run.name} ended without a good checkpoint; run folder: {folder}")
    with local_copy(latest) as ckpt:
        export(ckpt, cfg, os.path.join(local, "export"))
    summary = {"run": cfg.run.name, **summarize(read_metrics(local), time.time() - start),
               "checkpoint": latest, "export": storage.join(folder, "export"), **bad_records(cfg)}
    with open(os.path.join(local, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if local != folder:
        import pyarrow.fs as pafs

        fs, path = storage.resolve(folder)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return folder
