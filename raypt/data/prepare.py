"""`raypt data prepare`: raw text -> local BPE tokenizer -> packed fixed-length Parquet shards + manifest."""
from __future__ import annotations

import hashlib
import io
import sysconfig
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypt import storage
from raypt.config import PrepareConfig
from raypt.data.manifest import MANIFEST

EOS = "<|endoftext|>"
ROWS_PER_FILE = 4096


def stdlib_documents(max_bytes: int) -> Iterator[tuple[str, str]]:
    """The Python standard library's own sources: a real code corpus present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    total = 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if skip.intersection(rel.parts):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        yield str(rel), text
        total += len(text)
        if total >= max_bytes:
            return


def is_validation(name: str, fraction: float) -> bool:
    """A stable, content-independent split by document name, so re-preparing never leaks val into train."""
    return zlib.crc32(name.encode()) % 10_000 < fraction * 10_000


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenate documents with an EOS separator and cut into full windows (the ragged tail is dropped)."""
    flat = np.fromiter((t for ids in token_lists for t in (*ids, eos_id)), dtype=np.int32)
    n = len(flat) // seq_len
    return flat[: n * seq_len].reshape(n, seq_len)


def write_split(fs: pafs.FileSystem, root: str, split: str, rows: np.ndarray, rows_per_group: int) -> dict:
    files = []
    for start in range(0, len(rows), ROWS_PER_FILE):
        part = rows[start:start + ROWS_PER_FILE]
        table = pa.table({
            "sample_id": pa.array(np.arange(start, start + len(part), dtype=np.int64)),
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), part.shape[1]),
        })
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=rows_per_group, compression="zstd")
        data = buf.getvalue()
        name = f"{split}-{len(files):05d}.parquet"
        with fs.open_output_stream(f"{root}/{name}") as f:
            f.write(data)
        groups = [len(part[i:i + rows_per_group]) for i in range(0, len(part), rows_per_group)]
        files.append({"path": name, "rows": len(part), "row_groups": groups, "bytes": len(data),
                      "sha256": hashlib.sha256(data).hexdigest()})
    return {"rows": int(len(rows)), "files": files}


def prepare(out: str, cfg: PrepareConfig) -> dict:
    docs = list(stdlib_documents(cfg.max_bytes))
    train_docs = [t for name, t in docs if not is_validation(name, cfg.val_fraction)]
    val_docs = [t for name, t in docs if is_validation(name, cfg.val_fraction)]
    if not val_docs:
        val_docs = [train_docs.pop()]
    tok = train_tokenizer(train_docs, cfg.vocab_size)
    eos_id = tok.convert_tokens_to_ids(EOS)
    fs, root = storage.resolve(out)
    fs.create_dir(root, recursive=True)
    splits = {}
    for split, texts in (("train", train_docs), ("val", val_docs)):
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        rows = pack(ids, eos_id, cfg.seq_len)
        if len(rows) == 0:
            raise ValueError(f"data.prepare: the {split} split packs into no sequence of {cfg.seq_len} tokens; "
                             f"raise data.prepare.max_bytes ({cfg.max_bytes}) or lower seq_len")
        splits[split] = write_split(fs, root, split, rows, cfg.rows_per_group)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        fs.create_dir(f"{root}/tokenizer", recursive=True)
        pafs.copy_files(tmp, f"{root}/tokenizer", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    manifest = {"format": "raypt-tokens/1", "source": cfg.source, "seq_len": cfg.seq_len,
                "vocab_size": len(tok), "eos_id": eos_id, "tokenizer": "tokenizer", "documents": len(docs),
                "splits": splits}
    storage.write_json(storage.join(out, MANIFEST), manifest)
    return manifest
