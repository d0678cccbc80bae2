"""`raypt data prepare`: raw text, images or audio -> checked Parquet shards + a manifest (files, rows, checksums).

Text (files, or a code corpus of the install) is tokenized (a local byte-level BPE, the tokenizer of another
prepared dataset, or that of a Hugging Face folder such as a model export) and packed into fixed-length sequences
with an end-of-document separator (see prepare_text). Images and audio stay encoded (they are decoded and augmented
at training time) but every record is decoded once here, so a bad one is caught before any training. A labelled
image set (digits) keeps each image's class in a `label` column, for evaluation only (linear probes, kNN): training
never reads it.

Inputs are read in pieces by Ray tasks (or in this process) and one ordered writer makes the shards, so memory
stays within data.prepare.max_memory_mb whatever the corpus size and the files are the same at any parallelism.
"""
from __future__ import annotations

import io

import pyarrow as pa

from raypt import storage
from raypt.config import ConfigError, DataConfig, PrepareConfig
from raypt.data import corpora, inputs
from raypt.data.inputs import Piece, is_validation, record_name
from raypt.data.manifest import MANIFEST
from raypt.data.prepare_text import prepare_text
from raypt.data.shards import Shards, ShardWriter
from raypt.data.workers import Budget, Progress, Workers, parallelism

MODALITY = {"stdlib": "text", "cpp-headers": "text", "site-python": "text", "text": "text", "images": "image",
            "skimage": "image", "digits": "image", "audio": "audio", "stdlib-audio": "audio"}


class BadRecords:
    """What could not be read, by name and reason; the policy decides whether a run may go on without them."""

    def __init__(self, on_bad: str, max_fraction: float):
        self.on_bad, self.max_fraction = on_bad, max_fraction
        self.records: list[dict] = []
        self.seen = 0

    def add(self, name: str, reason: str) -> None:
        self.records.append({"name": name, "reason": reason})
        if self.on_bad == "fail":
            raise ConfigError(f"data.on_bad_record: 'fail' and {name}: {reason} (set it to 'skip' to leave out "
                              f"bad records, up to data.max_bad_fraction)")

    def check(self) -> dict:
        total = self.seen + len(self.records)
        if total and len(self.records) / total > self.max_fraction:
            names = "; ".join(f"{r['name']}: {r['reason']}" for r in self.records[:10])
            raise ConfigError(f"data.max_bad_fraction: {len(self.records)} of {total} records are bad "
                              f"({len(self.records) / total:.1%} > {self.max_fraction:.1%}): {names}")
        return {"count": len(self.records), "total": total, "records": self.records[:1000]}


def media_task(pieces: list[Piece], kind: str, field: str, max_side: int | None, block: int) -> list[dict]:
    """Each piece's images or sounds that decode, as (key, stored bytes), and its bad records (key, reason)."""
    from raypt.data import decode  # here: it imports torch (for augmentation), which text never needs

    check = decode.decode_image if kind == "image" else decode.decode_audio
    out = []
    for piece in pieces:
        good, bad = [], []
        for key, data, reason in inputs.records(piece, field, field, block):
            if reason is None:
                try:
                    decoded = check(data)
                except decode.BadRecord as e:
                    reason = str(e)
            if reason is not None:
                bad.append((key, reason))
            else:
                good.append((key, shrink(decoded, data, max_side, decode.RESAMPLE) if kind == "image" else data))
        out.append({"records": good, "bad": bad})
    return out


def shrink(image, data: bytes, max_side: int | None, resample: int) -> bytes:
    """Store photos no larger than training needs: decoding a small PNG at every epoch costs a fraction of the
    original's, and read tasks share the CPUs with the ranks."""
    if max_side is None or max(image.size) <= max_side:
        return data
    image.thumbnail((max_side, max_side), resample=resample)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def split(records: list, fraction: float) -> dict[str, list]:
    """Train and validation records; each split gets at least one."""
    val = [r for r in records if is_validation(r[0], fraction)]
    train = [r for r in records if not is_validation(r[0], fraction)]
    if not val and len(train) > 1:
        val = [train.pop()]
    if not train and len(val) > 1:
        train = [val.pop()]
    return {"train": train, "val": val}


def split_by_label(records: list[tuple[str, bytes, int]], fraction: float) -> dict[str, list]:
    """`split` within each class (the record's last item), so both splits hold every class; records keep their
    order, so a validation read of the first batches is not one class."""
    val = {r[0] for label in {r[-1] for r in records}
           for r in split([r for r in records if r[-1] == label], fraction)["val"]}
    return {"train": [r for r in records if r[0] not in val], "val": [r for r in records if r[0] in val]}


class MediaSplits:
    """Records written to their split as they come, each split's latest held back: when one split ends empty, the
    other's last record moves to it, as `split` does."""

    def __init__(self, shards: Shards, column: str):
        self.column = column
        self.writers = {s: ShardWriter(shards, s) for s in ("train", "val")}
        self.held: dict[str, tuple | None] = {"train": None, "val": None}
        self.counts = {"train": 0, "val": 0}

    def add(self, name: str, data: bytes, fraction: float) -> None:
        s = "val" if is_validation(name, fraction) else "train"
        if self.held[s] is not None:
            self._write(s, self.held[s])
        self.held[s] = (name, data)
        self.counts[s] += 1

    def close(self) -> dict:
        for s, other in (("val", "train"), ("train", "val")):
            if not self.counts[s] and self.counts[other] > 1:
                self.held[s], self.held[other] = self.held[other], None
        for s, record in self.held.items():
            if record is not None:
                self._write(s, record)
        return {s: w.close() for s, w in self.writers.items()}

    def _write(self, split: str, record: tuple) -> None:
        self.writers[split].add({self.column: pa.array([record[1]], pa.binary()), "name": pa.array([record[0]])})


def prepare_media(shards: Shards, cfg: PrepareConfig, kind: str, bad: BadRecords, workers: Workers) -> dict:
    column = "image" if kind == "image" else "audio"
    if cfg.source == "digits":  # 1,797 small images: they fit anywhere
        parts = split_by_label(corpora.digits(cfg.image_max_side or corpora.DIGIT_SIDE), cfg.val_fraction)
        shards.start()
        splits = {}
        for name, recs in parts.items():
            writer = ShardWriter(shards, name)
            writer.add({column: pa.array([r[1] for r in recs], pa.binary()), "name": pa.array([r[0] for r in recs]),
                        "label": pa.array([r[2] for r in recs], pa.int64())})
            splits[name] = writer.close()
        labels = len({r[2] for r in parts["train"]})  # classes, for evaluation only
        return {"format": f"raypt-{column}/1", "documents": sum(map(len, parts.values())), "labels": labels,
                "splits": splits}
    budget = Budget(cfg.max_memory_mb)
    files = inputs.expand(cfg.inputs or corpora.packaged_inputs(cfg.source),
                          inputs.EXTENSIONS["images" if kind == "image" else "audio"], bad)
    tasks = inputs.group([p for uri, size in files for p in inputs.cut(uri, size, budget.task_bytes)],
                         budget.task_bytes)
    shards.start()
    out = MediaSplits(shards, column)
    progress = Progress("check", sum(p.bytes for t in tasks for p in t))
    jobs = [(t, kind, cfg.image_field, cfg.image_max_side, budget.task_bytes // 8) for t in tasks]
    for task, results in zip(tasks, workers.map(media_task, jobs)):
        for piece, r in zip(task, results):
            for key, reason in r["bad"]:
                bad.add(record_name(piece, key, 0), reason)
            for key, data in r["records"]:
                out.add(record_name(piece, key, 0), data, cfg.val_fraction)
                bad.seen += 1
            progress.add(1, piece.bytes, len(r["records"]), len(r["bad"]))
    progress.close()
    splits = out.close()
    bad.check()
    if not splits["train"]["rows"] or not splits["val"]["rows"]:
        raise ConfigError(f"data.prepare.inputs: {kind} sources need at least 2 readable files, found "
                          f"{sum(out.counts.values())}")
    return {"format": f"raypt-{column}/1", "documents": sum(out.counts.values()), "splits": splits}


def prepare(out: str, cfg: PrepareConfig, data: DataConfig | None = None, memory: dict | None = None) -> dict:
    """Prepare one dataset into `out`; `data` carries the bad-record policy (skip up to 1 % by default).
    `memory`, when given, receives the peak memory of the driver and of the largest task (benchmarks, tests)."""
    policy = data or DataConfig()
    bad = BadRecords(policy.on_bad_record, policy.max_bad_fraction)
    kind = MODALITY[cfg.source]
    fs, root = storage.resolve(out)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as e:
        raise ConfigError(f"data.path: {storage.explain(out, e)}") from None
    workers = Workers(parallelism(cfg.parallel))
    shards = Shards(fs, root, cfg.rows_per_group)
    try:
        body = (prepare_text(fs, root, cfg, bad, workers, shards) if kind == "text"
                else prepare_media(shards, cfg, kind, bad, workers))
    except BaseException:
        shards.remove()  # no manifest was written: leave no shards of a preparation that did not finish
        raise
    manifest = {**body, "modality": kind, "source": cfg.source, "bad_records": bad.check()}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    if memory is not None:
        memory.update(workers.memory())
    return manifest
