"""`raypt data prepare`: raw text, images or audio -> checked Parquet shards + a manifest (files, rows, checksums).

Text (files, or a code corpus of the install) is tokenized (a local byte-level BPE, the tokenizer of another
prepared dataset, or that of a Hugging Face folder such as a model export) and packed into fixed-length sequences
with an end-of-document separator. Images and audio stay encoded (they are decoded and augmented at training time)
but every record is decoded once here, so a bad one is caught before any training. A labelled image set (digits)
keeps each image's class in a `label` column, for evaluation only (linear probes, kNN): training never reads it.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypt import storage
from raypt.config import ConfigError, DataConfig, PrepareConfig
from raypt.data import corpora, decode
from raypt.data.manifest import MANIFEST
from raypt.data.tokenizer import shared_tokenizer, train_tokenizer

ROWS_PER_FILE = 4096
EXTENSIONS = {"text": (".txt", ".jsonl", ".parquet"), "images": (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp",
              ".tif", ".tiff", ".parquet"), "audio": (".wav", ".flac", ".aiff", ".au")}
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


def expand(inputs: list[str], extensions: tuple[str, ...], bad: BadRecords) -> list[str]:
    """Files, folders (recursively) and globs, local or s3://, in a stable order; a missing one is a bad record."""
    found = []
    for item in inputs:
        fs, path = storage.resolve(item)
        prefix = item.split("://", 1)[0] + "://" if "://" in item else ""
        pattern = any(c in path for c in "*?[")
        base = path.rsplit("/", 1)[0] if pattern else path
        try:
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.File:
                found.append(item)
                continue
            if info.type == pafs.FileType.NotFound:
                bad.add(item, "missing file or folder")
                continue
            files = [i.path for i in fs.get_file_info(pafs.FileSelector(base, recursive=not pattern))
                     if i.type == pafs.FileType.File]
        except OSError as e:
            raise ConfigError(f"data.prepare.inputs: {storage.explain(item, e)}") from None
        matched = [f for f in files if (fnmatch.fnmatch(f, path) if pattern else f.lower().endswith(extensions))]
        if not matched:
            bad.add(item, f"matches no {'/'.join(extensions)} file")
        found += [prefix + f for f in sorted(matched)]
    return found


def read_bytes(uri: str) -> bytes:
    fs, path = storage.resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def parquet_column(uri: str, field: str, kind: str, bad: BadRecords) -> list | None:
    """The values of a .parquet input's string or binary column; None (a bad record) when it has none."""
    data = read_bytes(uri)
    try:
        table = pq.read_table(io.BytesIO(data))
    except pa.ArrowException as e:
        bad.add(uri, f"unreadable Parquet ({len(data)} bytes): {str(e).splitlines()[0]}")
        return None
    checks = (pa.types.is_string, pa.types.is_large_string) if kind == "string" else (
        pa.types.is_binary, pa.types.is_large_binary)
    ftype = table.schema.field(field).type if field in table.column_names else None
    if ftype is None or not any(check(ftype) for check in checks):
        bad.add(uri, f"schema mismatch: no {kind} column '{field}' (has {table.schema})")
        return None
    return table.column(field).to_pylist()


def text_records(uri: str, cfg: PrepareConfig, bad: BadRecords) -> Iterator[tuple[str, str]]:
    """(name, document) pairs of a .txt, .jsonl or .parquet file; records of the wrong shape are bad records."""
    if uri.endswith(".parquet"):
        values = parquet_column(uri, cfg.text_field, "string", bad)
        yield from ((f"{uri}#{i}", t or "") for i, t in enumerate(values or []))
        return
    data = read_bytes(uri)
    if uri.endswith(".txt"):
        yield uri, data.decode("utf-8", errors="replace")
        return
    for i, line in enumerate(data.decode("utf-8", errors="replace").splitlines()):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            bad.add(f"{uri}:{i + 1}", "not a JSON line")
            continue
        if not isinstance(doc, dict) or not isinstance(doc.get(cfg.text_field), str):
            bad.add(f"{uri}:{i + 1}", f"schema mismatch: no string field '{cfg.text_field}'")
            continue
        yield f"{uri}:{i + 1}", doc[cfg.text_field]


def documents(cfg: PrepareConfig, bad: BadRecords) -> list[tuple[str, str]]:
    if cfg.source in corpora.TEXT:
        return corpora.text_documents(cfg.source, cfg.max_bytes)
    docs = []
    for uri in expand(cfg.inputs, EXTENSIONS["text"], bad):
        for name, text in text_records(uri, cfg, bad):
            if text.strip():
                docs.append((name, text))
                bad.seen += 1
            else:
                bad.add(name, "empty document")
    return docs


def media(cfg: PrepareConfig, kind: str, bad: BadRecords) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) of every image or sound that decodes; the rest are bad records."""
    check = decode.decode_image if kind == "image" else decode.decode_audio
    inputs = cfg.inputs or corpora.packaged_inputs(cfg.source)
    out = []
    for uri in expand(inputs, EXTENSIONS["images" if kind == "image" else "audio"], bad):
        if uri.endswith(".parquet"):
            values = parquet_column(uri, cfg.image_field, "binary", bad)
            items = [(f"{uri}#{i}", b or b"") for i, b in enumerate(values or [])]
        else:
            items = [(uri, read_bytes(uri))]
        for name, data in items:
            try:
                decoded = check(data)
            except decode.BadRecord as e:
                bad.add(name, str(e))
                continue
            out.append((name, shrink(decoded, data, cfg.image_max_side) if kind == "image" else data))
            bad.seen += 1
    return out


def shrink(image, data: bytes, max_side: int | None) -> bytes:
    """Store photos no larger than training needs: decoding a small PNG at every epoch costs a fraction of the
    original's, and read tasks share the CPUs with the ranks."""
    if max_side is None or max(image.size) <= max_side:
        return data
    image.thumbnail((max_side, max_side), resample=decode.RESAMPLE)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def is_validation(name: str, fraction: float) -> bool:
    """A stable, content-independent split by record name, so re-preparing never leaks val into train."""
    return zlib.crc32(name.encode()) % 10_000 < fraction * 10_000


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


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents with an EOS separator and cut into full windows (the ragged tail is dropped)."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def write_split(fs: pafs.FileSystem, root: str, name: str, columns: dict[str, pa.Array], rows_per_group: int) -> dict:
    """Shards of ROWS_PER_FILE rows, each with a running `sample_id`, its row groups and checksum listed."""
    rows, files = len(next(iter(columns.values()))), []
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        table = pa.table({"sample_id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                          **{k: v.slice(start, n) for k, v in columns.items()}})
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=rows_per_group, compression="zstd")
        data = buf.getvalue()
        path = f"{name}-{len(files):05d}.parquet"
        with fs.open_output_stream(f"{root}/{path}") as f:
            f.write(data)
        groups = [min(rows_per_group, n - i) for i in range(0, n, rows_per_group)]
        files.append({"path": path, "rows": n, "row_groups": groups, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    return {"rows": int(rows), "files": files}


def prepare_text(fs, root: str, cfg: PrepareConfig, bad: BadRecords) -> dict:
    parts = split(documents(cfg, bad), cfg.val_fraction)
    bad.check()  # before any shard is written
    texts = {k: [t for _, t in v] for k, v in parts.items()}
    tok = shared_tokenizer(cfg.tokenizer) if cfg.tokenizer else train_tokenizer(texts["train"], cfg.vocab_size)
    eos_id = tok.eos_token_id
    splits = {}
    for name, docs in texts.items():
        rows = pack(tok(docs, add_special_tokens=False)["input_ids"], eos_id, cfg.seq_len) if docs else np.zeros(0)
        if len(rows) == 0:
            raise ConfigError(f"data.prepare: the {name} split packs into no sequence of {cfg.seq_len} tokens; "
                              f"raise data.prepare.max_bytes ({cfg.max_bytes}), add inputs or lower seq_len")
        ids = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), cfg.seq_len)
        splits[name] = write_split(fs, root, name, {"input_ids": ids}, cfg.rows_per_group)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        fs.create_dir(f"{root}/tokenizer", recursive=True)
        pafs.copy_files(tmp, f"{root}/tokenizer", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        digest = hashlib.sha256(Path(tmp, "tokenizer.json").read_bytes()).hexdigest()
    return {"format": "raypt-tokens/1", "seq_len": cfg.seq_len, "vocab_size": len(tok), "eos_id": eos_id,
            "tokenizer": "tokenizer", "tokenizer_sha256": digest, "documents": sum(map(len, texts.values())),
            "splits": splits}


def prepare_media(fs, root: str, cfg: PrepareConfig, kind: str, bad: BadRecords) -> dict:
    if cfg.source == "digits":
        parts = split_by_label(corpora.digits(cfg.image_max_side or corpora.DIGIT_SIDE), cfg.val_fraction)
    else:
        parts = split(media(cfg, kind, bad), cfg.val_fraction)
    bad.check()
    if not parts["train"] or not parts["val"]:
        raise ConfigError(f"data.prepare.inputs: {kind} sources need at least 2 readable files, found "
                          f"{sum(map(len, parts.values()))}")
    column = "image" if kind == "image" else "audio"
    labelled = cfg.source == "digits"
    splits = {}
    for name, recs in parts.items():
        columns = {column: pa.array([r[1] for r in recs], pa.binary()), "name": pa.array([r[0] for r in recs])}
        if labelled:
            columns["label"] = pa.array([r[2] for r in recs], pa.int64())
        splits[name] = write_split(fs, root, name, columns, cfg.rows_per_group)
    labels = {"labels": len({r[2] for r in parts["train"]})} if labelled else {}  # classes, for evaluation only
    return {"format": f"raypt-{column}/1", "documents": sum(map(len, parts.values())), **labels, "splits": splits}


def prepare(out: str, cfg: PrepareConfig, data: DataConfig | None = None) -> dict:
    """Prepare one dataset into `out`; `data` carries the bad-record policy (skip up to 1 % by default)."""
    policy = data or DataConfig()
    bad = BadRecords(policy.on_bad_record, policy.max_bad_fraction)
    kind = MODALITY[cfg.source]
    fs, root = storage.resolve(out)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as e:
        raise ConfigError(f"data.path: {storage.explain(out, e)}") from None
    body = prepare_text(fs, root, cfg, bad) if kind == "text" else prepare_media(fs, root, cfg, kind, bad)
    manifest = {**body, "modality": kind, "source": cfg.source, "bad_records": bad.check()}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest
