"""Experiment trackers: where the sink sends every record besides metrics.jsonl (`run.trackers`). TensorBoard is a
base dependency; MLflow and W&B are optional extras, imported only when a run selects them. Their tracking
servers, modes and credentials come from the environment only (MLFLOW_TRACKING_URI, WANDB_MODE, WANDB_API_KEY,
...): job files end up in version control, logs and checkpoints. Light at import: the config names the trackers."""
from __future__ import annotations

import importlib.util
import json
import os
import secrets
import time
from typing import ClassVar, Iterable, Optional, Sequence

from raypt.schema import ConfigError

SKIPPED = ("step", "time")  # the x axis and the wall clock, not metrics


def numeric(record: dict) -> dict[str, float]:
    """A record's metrics: its numbers, less the step and the time (sample ids, notes and flags are not series)."""
    return {k: float(v) for k, v in record.items()
            if k not in SKIPPED and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One destination of the run's records. The sink calls start once, resume at every attempt (before its
    records), log with the records of each flush in step order, and close at the end."""
    modules: ClassVar[tuple[str, ...]] = ()  # what start imports; check() looks for them before any cluster work
    install: ClassVar[str] = ""  # the pip line that brings them
    files: ClassVar[tuple[str, ...]] = ()  # what it keeps in the run folder: mirrored to a remote run's storage

    @classmethod
    def needs(cls) -> tuple[str, ...]:
        return cls.modules

    @classmethod
    def prepare(cls, group: str) -> None:
        """Once, in a sweep's driver, before its trials start: what the group's runs share (created here, not by
        concurrent trials racing to create it)."""

    def start(self, run_name: str, group: Optional[str], config: dict, folder: str) -> None:
        """`config` is the resolved job, `folder` the run's local folder (for files the tracker keeps)."""

    def resume(self, start_step: int) -> None:
        """An attempt starts after `start_step`: records past it that this tracker holds are about to come again."""

    def log(self, records: Sequence[dict]) -> None:
        """The records of one flush: each has "step"; its numbers (see numeric) are the metrics."""
        raise NotImplementedError

    def flush(self) -> None:
        """Its files hold every record logged so far (called before they are copied to storage)."""

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    """Scalars under `tensorboard/` in the run folder."""
    modules = ("tensorboard",)
    install = "pip install tensorboard"
    files = ("tensorboard",)

    def start(self, run_name: str, group: Optional[str], config: dict, folder: str) -> None:
        self.dir, self.writer = os.path.join(folder, "tensorboard"), None

    def resume(self, start_step: int) -> None:
        # A new writer with purge_step hides what an earlier attempt wrote past start_step: each step shows once.
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self.writer = SummaryWriter(self.dir, purge_step=start_step + 1)

    def log(self, records: Sequence[dict]) -> None:
        for record in records:
            for key, value in numeric(record).items():
                self.writer.add_scalar(key, value, record["step"])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Service(Tracker):
    """A tracker whose service keeps the run (MLflow, W&B). A small file in the run folder holds the service's
    run id, so a restarted driver continues the same run, and the last step sent: neither service can take
    points back, so steps it already holds keep their first values (those an uninterrupted run has) instead of
    appearing twice."""
    file: ClassVar[str]

    def load(self, folder: str) -> dict:
        self.path = os.path.join(folder, self.file)
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            return json.load(f)

    def save(self, run_id: str, step: int) -> None:
        self.run_id, self.step = run_id, step
        with open(self.path + ".tmp", "w") as f:
            json.dump({"id": run_id, "step": step}, f)
        os.replace(self.path + ".tmp", self.path)  # a crash mid-write must not lose the run id

    def log(self, records: Sequence[dict]) -> None:
        new = [r for r in records if r["step"] > self.step]
        if new:
            self.send(new)
            self.save(self.run_id, max(r["step"] for r in new))

    def send(self, records: list[dict]) -> None:
        raise NotImplementedError


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys -> text: sections become prefixes; lists and other values become JSON (strings as they are)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def database_uri(uri: str) -> bool:
    """MLflow's own default store (no URI) and database URIs need SQLAlchemy, which mlflow-skinny leaves out."""
    return not uri or uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql")


def experiment(client: "mlflow.MlflowClient", name: str) -> str:
    """The id of the MLflow experiment `name`, created if the store does not hold it."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # another process created it first
        return client.get_experiment_by_name(name).experiment_id


class MLflow(Service):
    """One MLflow run per raypt run, in the experiment named by run.group (else by the run): the resolved job as
    params and as the artifact config.yaml, every metric at its step. Tracking URI from MLFLOW_TRACKING_URI."""
    file = "mlflow_run.json"
    files = (file,)
    install = "pip install 'raypt[mlflow]'"

    @classmethod
    def needs(cls) -> tuple[str, ...]:
        sql = database_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))
        return ("mlflow", "sqlalchemy", "alembic") if sql else ("mlflow",)

    @classmethod
    def prepare(cls, group: str) -> None:
        # A file store checks the name and then writes a new id: two trials creating it at once would make two
        # experiments of one name, and the sweep's runs would be split between them.
        from mlflow import MlflowClient

        experiment(MlflowClient(), group)

    def start(self, run_name: str, group: Optional[str], config: dict, folder: str) -> None:
        import yaml
        from mlflow import MlflowClient
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        self.client = MlflowClient()  # no URI argument: the environment's, else MLflow's default
        saved = self.load(folder)
        run = self.existing(saved.get("id"))
        if run is None:
            tags = {"raypt.run": run_name, **({"raypt.group": group} if group else {})}
            run = self.client.create_run(experiment(self.client, group or run_name), tags=tags, run_name=run_name)
            saved = {"step": -1}
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.save(run.info.run_id, saved["step"])
        # Params are immutable in MLflow: a resumed run keeps those it started with (a finished run given more
        # steps changes train.steps); config.yaml is the latest resolved job. The cut keeps within MLflow's limit.
        cut = MAX_PARAM_VAL_LENGTH - 3
        params = [Param(k, v if len(v) <= MAX_PARAM_VAL_LENGTH else v[:cut] + "...")
                  for k, v in flatten(config).items() if k not in run.data.params]
        for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MAX_PARAMS_TAGS_PER_BATCH])
        self.client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")

    def existing(self, run_id: Optional[str]) -> "Optional[mlflow.entities.Run]":
        """The run this folder's file names, unless the tracking store does not hold it (another store, deleted)."""
        from mlflow.exceptions import MlflowException

        if run_id is None:
            return None
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        return run if run.info.lifecycle_stage == "active" else None

    def send(self, records: list[dict]) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        now = time.time()  # for records without a time (the step-0 evaluation)
        metrics = [Metric(k, v, int(r.get("time", now) * 1000), r["step"]) for r in records
                   for k, v in numeric(r).items()]
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class WandB(Service):
    """One W&B run per raypt run: project WANDB_PROJECT (else raypt), group run.group, the resolved job as its
    config. Mode, entity and API key from the environment (WANDB_MODE, WANDB_ENTITY, WANDB_API_KEY)."""
    file = "wandb_run.json"
    files = (file,)
    modules = ("wandb",)
    install = "pip install 'raypt[wandb]'"

    def start(self, run_name: str, group: Optional[str], config: dict, folder: str) -> None:
        import wandb

        saved = self.load(folder)
        run_id = saved.get("id") or secrets.token_hex(8)  # W&B takes any id of letters and digits
        # console off: the sink actor's output is Ray's log stream, not the training console.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "raypt", group=group, name=run_name,
                              id=run_id, resume="allow", config=config, dir=folder,
                              settings=wandb.Settings(console="off"))
        self.save(run_id, saved.get("step", -1))

    def send(self, records: list[dict]) -> None:
        for record in records:
            self.run.log(numeric(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


TRACKERS: dict[str, type[Tracker]] = {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB}


def check(names: Iterable[str]) -> None:
    """Before any cluster work: every selected tracker's packages are installed."""
    for name in names:
        needed = TRACKERS[name].needs()
        missing = [m for m in needed if importlib.util.find_spec(m) is None]
        if missing:
            what = f"the {needed[0]} package" if needed[0] in missing else " and ".join(missing)
            raise ConfigError(f"run.trackers: {name!r} needs {what}: {TRACKERS[name].install}")
