"""What every command checks before any cluster work: the services it names answer within seconds, and its paths
hold what it will read. A service that does not answer raises `Unreachable` (the CLI exits 1); a path that holds
the wrong thing, a missing bucket or refused credentials raise a ConfigError naming the field (exit 2)."""
from __future__ import annotations

import os
import socket
import tempfile
import types
from typing import Annotated, Any, Iterator, Optional, Union, get_args, get_origin
from urllib.parse import urlsplit

import pyarrow.fs as pafs
from pydantic import AfterValidator, BaseModel

from raypt import storage
from raypt.schema import ConfigError, absolute

PROBE_S = 3.0  # one TCP connect: a live service on any network answers far sooner
PORTS = {"ray": 10001, "http": 80, "https": 443, "": 6379}  # Ray client, dashboard/S3, GCS (a bare host:port)


class Unreachable(ConfigError):
    """A service a command needs does not answer: one message, exit status 1. A ConfigError too, since what the job
    names is often what is wrong (a mistyped endpoint), and callers that refuse a job on any ConfigError do."""


def probe(address: str, field: str, what: str, uri: str = "") -> None:
    """One TCP connect to the host and port of `address` (host:port or scheme://host[:port]); `uri` is what the
    command wanted from it, for the message."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port or PORTS.get(parts.scheme, 443)
    except ValueError:
        port = None
    if not parts.hostname or not port:
        raise ConfigError(f"{field}: got {address!r} for {what}; expected host:port or scheme://host:port")
    if os.environ.get(f"{parts.scheme}_proxy") or os.environ.get(f"{parts.scheme.upper()}_PROXY"):
        return  # only the proxy is reached directly; the SDK's own bounded retries judge the service
    try:
        socket.create_connection((parts.hostname, port), timeout=PROBE_S).close()
    except OSError as e:
        wanted = f"'{uri}': " if uri else ""
        raise Unreachable(f"{field}: {wanted}cannot reach {what} at {address} ({e.strerror or e})") from None


def ray_cluster(address: Optional[str], field: str) -> None:
    """The cluster `address` names (RAY_ADDRESS or --address) answers; None and 'local' start an embedded one."""
    if not address or address == "local":
        return
    if address == "auto":  # what `ray start --head` leaves for ray.init(address='auto') to find
        marker = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")
        if not os.path.isfile(marker):
            raise Unreachable(f"{field}=auto: no Ray cluster was started on this machine (`ray start --head`)")
        with open(marker) as f:
            address = f.read().strip()
    probe(address, field, "the Ray cluster")


def s3_endpoint() -> str:
    """The S3 endpoint the AWS environment (with a job's `s3:` settings applied) points at."""
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    aws = f"https://s3.{region}.amazonaws.com" if region else "https://s3.amazonaws.com"
    return env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or aws


def reach(field: str, uri: str) -> None:
    """The storage behind `uri` answers, lets us in and has its bucket (nothing to check for a local path)."""
    if "://" not in uri:
        return
    if not uri.startswith("s3://"):
        raise ConfigError(f"{field}: got '{uri}'; expected a local path or an s3:// URI")
    probe(s3_endpoint(), field, "the S3 endpoint", uri)
    bucket = uri[len("s3://"):].split("/", 1)[0]
    try:
        fs, _ = storage.resolve(uri)
        found = fs.get_file_info(bucket).type
    except OSError as e:
        why = storage.explain(uri, e)
        raise (Unreachable if "cannot reach" in str(why) else ConfigError)(f"{field}: {why}") from None
    if found == pafs.FileType.NotFound:
        raise ConfigError(f"{field}: '{uri}': the bucket '{bucket}' does not exist at {s3_endpoint()}")


def _holds_paths(tp: Any, metadata: Any = ()) -> bool:
    """A field type of paths: Location, Optional[Location], list[Location] (schema.absolute resolves them)."""
    if any(isinstance(m, AfterValidator) and m.func is absolute for m in metadata):
        return True
    if get_origin(tp) is Annotated:
        return _holds_paths(get_args(tp)[0], get_args(tp)[1:])
    if get_origin(tp) in (Union, types.UnionType, list):
        return any(_holds_paths(arg) for arg in get_args(tp))
    return False


def locations(section: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every path and URI set in a config section and the sections below it."""
    for name, info in type(section).model_fields.items():
        key, value = f"{prefix}{name}", getattr(section, name)
        items = value if isinstance(value, list) else [value]
        if isinstance(value, BaseModel):
            yield from locations(value, f"{key}.")
        elif items and all(isinstance(v, BaseModel) for v in items):
            for i, item in enumerate(items):
                yield from locations(item, f"{key}.{i}.")
        elif _holds_paths(info.annotation, info.metadata):
            keys = [f"{key}.{i}" for i in range(len(value))] if isinstance(value, list) else [key]
            yield from ((k, v) for k, v in zip(keys, items) if v is not None)


def folder(field: str, uri: str) -> None:
    """`reach`, and a local folder field must not name a file."""
    reach(field, uri)
    if "://" not in uri and os.path.isfile(uri):
        raise ConfigError(f"{field}: '{uri}' is a file; expected a folder")


def own_checkpoints(cfg: Any) -> list[str]:
    from raypt.checkpoint import list_checkpoints

    return list_checkpoints(storage.join(cfg.run.storage, cfg.run.name))


def check_run(cfg: Any) -> list[dict]:
    """For a job about to train (or export): its storage answers, a run.resume_from that will be used holds a
    committed checkpoint, and every source is a prepared dataset the task takes; the sources' manifests."""
    folder("run.storage", cfg.run.storage)
    for i, source in enumerate(cfg.data.mix()):
        folder(source_field(cfg, i), source.path)
    if cfg.run.resume_from:
        reach("run.resume_from", cfg.run.resume_from)
        if not own_checkpoints(cfg):  # else the run's own checkpoints win (resume_note)
            from raypt.checkpoint import CheckpointError, read_state

            fs, path = storage.resolve(cfg.run.resume_from)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise ConfigError(f"run.resume_from: '{cfg.run.resume_from}' does not exist; expected a checkpoint "
                                  f"folder such as runs/NAME/step000100")
            try:
                read_state(cfg.run.resume_from)
            except CheckpointError as e:
                raise ConfigError(f"run.resume_from: {e}; expected a checkpoint folder such as "
                                  f"runs/NAME/step000100") from None
    manifests = check_data_path(cfg)
    if cfg.run.init_from and not own_checkpoints(cfg):  # else the run's own checkpoints win, as for resume_from
        check_init(cfg, manifests)
    check_sparsity(cfg, manifests)
    return manifests


def check_init(cfg: Any, manifests: list[dict]) -> None:
    """run.init_from holds a checkpoint or a Hugging Face folder whose parameters have this job's names and shapes
    (the model is built on the meta device: no memory, no initialisation)."""
    import torch

    from raypt.checkpoint import CheckpointError
    from raypt.checkpoint.init import check_shapes, is_checkpoint, model_shapes, source_shapes
    from raypt.tasks import by_modality, get_task

    uri = cfg.run.init_from.path
    reach("run.init_from.path", uri)
    fs, path = storage.resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise ConfigError(f"run.init_from.path: '{uri}' is not a folder; expected a checkpoint folder such as "
                          "runs/NAME/step000100 or a Hugging Face model folder")
    try:
        if cfg.run.init_from.optimizer == "keep" and not is_checkpoint(uri):
            raise CheckpointError(f"optimizer: keep, but '{uri}' is not a raypt checkpoint and so holds no "
                                  "optimizer state; use optimizer: reset")
        found = source_shapes(uri)
        if found is not None:
            with torch.device("meta"):
                model = get_task(cfg.model.task)(cfg, by_modality(manifests)).construct()
            check_shapes(model_shapes(model), found, uri)
    except CheckpointError as e:
        raise ConfigError(f"run.init_from: {e}") from None


def check_sparsity(cfg: Any, manifests: list[dict]) -> None:
    """A pruned run's window fits its length (a share against a token count needs the run's tokens) and each of
    sparsity.exclude matches a prunable weight (the model is built on the meta device)."""
    if cfg.sparsity.final == 0:
        return
    import torch

    from raypt.tasks import job_plan
    from raypt.sparsity.select import prunable
    from raypt.tasks import by_modality, get_task

    try:
        cfg.sparsity.schedule.window(job_plan(cfg, manifests).tokens_before(cfg.train.steps))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    with torch.device("meta"):
        model = get_task(cfg.model.task)(cfg, by_modality(manifests)).construct()
    prunable(model, cfg.sparsity)


def resume_note(cfg: Any) -> Optional[str]:
    """What a user who set run.resume_from must know when the run folder already holds checkpoints."""
    own = own_checkpoints(cfg) if cfg.run.resume_from else []
    if not own:
        return None
    return (f"run.resume_from={cfg.run.resume_from} is not used: run folder "
            f"{storage.join(cfg.run.storage, cfg.run.name)} already holds checkpoints, and the run continues from "
            f"its own newest ({own[-1].rsplit('/', 1)[-1]}); to start from resume_from, give the run a new "
            f"run.name")


def check_prepare(cfg: Any) -> None:
    """For `raypt data prepare`: every source's output folder, inputs and shared tokenizer answer, and a shared
    tokenizer is a prepared text dataset or a Hugging Face folder."""
    from raypt.data.tokenizer import tokenizer_folder

    for i, source in enumerate(cfg.data.mix()):
        out = source_field(cfg, i)
        where = out.rsplit(".", 1)[0] + ".prepare"
        folder(out, source.path)
        for j, item in enumerate(source.prepare.inputs):
            reach(f"{where}.inputs.{j}", item)
        tokenizer = source.prepare.tokenizer
        if tokenizer:
            reach(f"{where}.tokenizer", tokenizer)
            tokenizer_folder(tokenizer, f"{where}.tokenizer")


def source_field(cfg: Any, i: int) -> str:
    return f"data.sources.{i}.path" if cfg.data.sources else "data.path"


def prepared(field: str, path: str, remedy: str) -> dict:
    """The manifest of the prepared dataset at `path`, else a ConfigError naming `field` and what to do."""
    from raypt.data.manifest import read_manifest

    try:
        return read_manifest(path)
    except FileNotFoundError:
        raise ConfigError(f"{field}: '{path}' holds no prepared dataset (manifest.json missing); {remedy}") from None
    except storage.StorageError as e:
        raise ConfigError(f"{field}: {e}") from None


def check_data_path(cfg: Any) -> list[dict]:
    """Every source is prepared, readable and fits the task; returns the manifests, in mix order."""
    from raypt.data.manifest import modality
    from raypt.tasks import MODALITIES

    manifests = [prepared(source_field(cfg, i), source.path, "create it with `raypt data prepare JOB`")
                 for i, source in enumerate(cfg.data.mix())]
    takes = MODALITIES[cfg.model.task]
    for i, m in enumerate(manifests):
        if modality(m) not in takes:
            raise ConfigError(f"{source_field(cfg, i)}: holds {modality(m)} data, which model.task "
                              f"'{cfg.model.task}' does not take (it takes {', '.join(takes)})")
        if modality(m) == "text" and m["seq_len"] < 2:
            raise ConfigError(f"{source_field(cfg, i)}: '{m['root']}' has seq_len {m['seq_len']}; need >= 2")
    lengths = {m["seq_len"] for m in manifests if modality(m) == "text"}
    if len(lengths) > 1:
        raise ConfigError(f"data.sources: the text sources pack sequences of different lengths {sorted(lengths)}; "
                          f"prepare them with one data.sources.N.prepare.seq_len")
    vocabularies = {m["tokenizer_sha256"] for m in manifests if modality(m) == "text" and "tokenizer_sha256" in m}
    if len(vocabularies) > 1:
        raise ConfigError("data.sources: the text sources were tokenized with different tokenizers; prepare them "
                          "with data.sources.N.prepare.tokenizer set to one of them")
    check_eval_sources(cfg, manifests)
    return manifests


def check_eval_sources(cfg: Any, manifests: list[dict]) -> None:
    """Every evaluation-only dataset answers, is prepared, and is data the mix's model reads as it reads the mix's
    (`manifests`): a modality the mix has; text of its sequence length and tokenizer."""
    from raypt.data.manifest import modality

    have = {modality(m): m for m in manifests}  # one per modality: the mix's text sources agree (checked above)
    for i, source in enumerate(cfg.data.eval_sources):
        field = f"data.eval_sources.{i}.path"
        reach(field, source.path)
        m = prepared(field, source.path, "prepare it with `raypt data prepare` (in a job that trains on it)")
        kind, mix = modality(m), have.get(modality(m))
        if mix is None:
            raise ConfigError(f"{field}: '{source.path}' holds {kind} data; an evaluation-only dataset must be of a "
                              f"modality the mix trains on ({', '.join(sorted(have))})")
        if kind == "text" and m["seq_len"] != mix["seq_len"]:
            raise ConfigError(f"{field}: '{source.path}' packs sequences of {m['seq_len']} tokens; the mix's "
                              f"text packs {mix['seq_len']} (prepare it with prepare.seq_len={mix['seq_len']})")
        if kind == "text" and len({x["tokenizer_sha256"] for x in (m, mix) if "tokenizer_sha256" in x}) > 1:
            raise ConfigError(f"{field}: '{source.path}' was tokenized with another tokenizer than the mix's text; "
                              f"prepare it with prepare.tokenizer set to one of the mix's text sources")
