"""One trial: a whole raypt run (the driver's start, build and finish steps) under the sweep folder, its own
fault tolerance inside. Tune sees rank 0's reports at every evaluation and checkpoint: through Ray Train's
TuneReportCallback, or, under Population Based Training, from the trial itself, which follows its run's metrics
sink and hands Tune each committed raypt checkpoint as a small pointer (Tune then gives a weak trial the pointer of
a strong trial's checkpoint to continue from)."""
from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from typing import Any, Optional

from raypt import storage
from raypt.hooks.base import Hook

VALUES = "values.json"  # in a trial's run folder: its variant and searched values, as Tune drew them
POINTER = "raypt_checkpoint.json"  # what a Tune checkpoint of a trial holds: which raypt checkpoint it stands for


def trial_name(trial: Any) -> str:
    """Names a trial's Tune entry and its run folder the same stable way: trial-00003."""
    return f"trial-{trial.trial_id.rsplit('_', 1)[-1]}"


def trial_job(job: dict, values: dict, name: str, folder: str, sweep: str, variants: dict[str, list[str]]) -> Any:
    """The trial's job: the base job with its variant and searched values, run under the sweep folder."""
    from raypt import config
    from raypt.tune.sweep import trial_raw

    raw = trial_raw(job, values, variants)
    raw["run"].update(name=name, storage=folder, group=sweep)
    return config.from_dict(raw)


class Lineage(Hook):
    """The first record after an exploit says where the trial continued from: donor trial, step, new values. A
    donor's last checkpoint leaves no step to train: then a record at that step says it."""

    def __init__(self, donor: str, step: int, values: dict):
        self.note = {"trial": donor, "step": step, "values": values}

    def start(self, loop: Any, reader: Any) -> None:
        s = loop.state
        if loop.rank == 0 and loop.sink is not None and s.step >= loop.cfg.train.steps:
            loop.sink.log.remote([{"step": s.step, "tokens_seen": s.tokens_seen, "continued_from": self.note}])

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        if step == self.note["step"] + 1:
            record["continued_from"] = self.note


class Pace(Hook):
    """Under PBT, rank 0 waits after each checkpoint until Tune has taken its report (Tune's report returns only
    when Tune asks for the next result): Tune then decides to exploit before the trial trains on. The other ranks
    wait for rank 0 in the next step's collectives."""

    def __init__(self, sink: Any):
        self.sink = sink

    def step_end(self, loop: Any, step: int, record: dict) -> None:
        import ray

        while loop.rank == 0 and loop.saved_this_step and ray.get(self.sink.acked_step.remote()) < step:
            time.sleep(0.1)


def _donor_copy(pointer: dict, run: str) -> tuple[str, int]:
    """The donor's checkpoint copied into the trial's folder (`donor/`, which auto-resume does not list), and its
    step. The donor trains on and prunes its own checkpoints while this trial restarts, so the one Tune pointed at
    may be gone, or go during the copy: then the donor's next one."""
    from raypt import checkpoint

    donor = pointer["uri"].rsplit("/", 1)[0]
    newer = [u for u in checkpoint.list_checkpoints(donor) if u.rsplit("/", 1)[-1] > f"step{pointer['step']:06d}"]
    target = storage.join(run, "donor")
    fs, path = storage.resolve(target)
    for uri in [pointer["uri"], *newer]:
        fs.delete_dir_contents(path, missing_dir_ok=True)
        copy = storage.join(target, uri.rsplit("/", 1)[-1])
        try:
            storage.copy_tree(uri, copy)
            return copy, checkpoint.read_state(copy)[0].step
        except (FileNotFoundError, checkpoint.CheckpointError):
            continue
    raise checkpoint.CheckpointError(f"{pointer['trial']} kept no checkpoint at or after step {pointer['step']}")


def _continue_from_donor(cfg: Any, values: dict) -> tuple[Any, tuple]:
    """Under PBT Tune restarts a weak trial with a strong trial's pointer: the trial's own checkpoints are
    superseded (removed, so the donor's is the one it resumes), and a Lineage hook records the exploit."""
    from ray import tune

    from raypt import checkpoint

    given = tune.get_checkpoint()
    if given is None:
        return cfg, ()
    with given.as_directory() as d:
        pointer = json.load(open(os.path.join(d, POINTER)))
    if pointer["trial"] == cfg.run.name:  # its own checkpoint (a retry): auto-resume finds it
        return cfg, ()
    run = storage.join(cfg.run.storage, cfg.run.name)
    fs, _ = storage.resolve(run)
    for uri in checkpoint.list_checkpoints(run):
        fs.delete_dir(storage.resolve(uri)[1])
    uri, step = _donor_copy(pointer, run)
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"resume_from": uri})})
    return cfg, (Lineage(pointer["trial"], step, values),)


def _to_sink(sink: Any) -> Any:
    """A Ray Train callback (it runs in the Train controller) that hands rank 0's reports to the run's sink."""
    from ray.train import UserCallback

    class ToSink(UserCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            sink.report.remote(metrics[0])

    return ToSink()


def _report_followed(cfg: Any, sink: Any, fit: threading.Thread) -> None:
    """Hand Tune every report of the run, each checkpoint once it is committed, as a pointer to it."""
    import ray
    from ray import tune

    from raypt import checkpoint, storage

    run = storage.join(cfg.run.storage, cfg.run.name)
    while True:
        alive = fit.is_alive()
        for report in ray.get(sink.take_reports.remote()):
            if "checkpoint_s" not in report:  # an evaluation without a checkpoint
                tune.report(report)
                sink.ack.remote(report["step"])
                continue
            uri = storage.join(run, f"step{report['step']:06d}")
            while fit.is_alive():  # the upload runs beside training; wait for its index
                try:
                    checkpoint.read_state(uri)
                    break
                except checkpoint.CheckpointError:
                    time.sleep(0.1)
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, POINTER), "w") as f:
                    json.dump({"trial": cfg.run.name, "uri": uri, "step": report["step"]}, f)
                tune.report({**report, "checkpoint": uri}, checkpoint=tune.Checkpoint.from_directory(d))
            sink.ack.remote(report["step"])
        if not alive:
            return
        time.sleep(0.2)


def run_trial(params: dict, job: dict, folder: str, sweep: str, env: dict, follow: bool = False,
              variants: Optional[dict[str, list[str]]] = None) -> None:
    """Tune's function trainable. A retried or resumed trial continues from its own latest checkpoint: its run
    folder keeps its name. Trials do not export models (`raypt export` works on any trial's folder). `env`: the
    sweep driver's tracker settings, which the trial's own metrics sink reads."""
    import ray
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raypt import driver

    os.environ.update(env)
    cfg = trial_job(job, params["values"], tune.get_context().get_trial_name(), folder, sweep, variants or {})
    storage.write_json(storage.join(folder, cfg.run.name, VALUES), params["values"])  # the table's variant column
    cfg, hooks = _continue_from_donor(cfg, params["values"]) if follow else (cfg, ())
    sink = driver.start(cfg)
    hooks = (*hooks, Pace(sink)) if follow else hooks
    trainer = driver.build(cfg, sink, callbacks=[_to_sink(sink) if follow else TuneReportCallback()], hooks=hooks)
    began, outcome = time.time(), {}

    def fit() -> None:
        try:
            trainer.fit()
        except Exception as e:  # recorded in the run folder by finish, raised to Tune, which retries the trial
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()
    if follow:
        _report_followed(cfg, sink, thread)
    thread.join()
    ray.get(sink.close.remote())
    driver.finish(cfg, outcome.get("error"), time.time() - began, export=False)

