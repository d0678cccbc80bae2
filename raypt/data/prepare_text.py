"""Text in two passes over the inputs, each spread over tasks and taken back in input order.

1. check: every record is read and checked (bad records by policy, counted before any shard is written), each
   document's split decided by its name, and a deterministic sample of the training documents (by a hash of their
   text, at most max_memory_mb / 16 of it) kept to train the tokenizer on;
2. tokenize: tasks return each input piece's documents as int32 tokens, each followed by EOS, per split, and the
   ordered writer packs them into rows across document boundaries and cuts shards as it goes.
Names, splits, the sample and the packing depend on the inputs alone, so the files are the same at any parallelism.
"""
from __future__ import annotations

import hashlib
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from tokenizers import Tokenizer

from raypt.config import ConfigError, PrepareConfig
from raypt.data import corpora, inputs
from raypt.data.inputs import Piece, is_validation, record_name
from raypt.data.shards import Shards, ShardWriter, TokenPacker
from raypt.data.tokenizer import shared_tokenizer, train_tokenizer
from raypt.data.workers import MB, Budget, Progress, Workers

SPLITS = ("train", "val")


def check_task(pieces: list[Piece], text_field: str, rate: float, block: int) -> list[dict]:
    """Each piece's lines (to number the next piece's), its good documents (key, characters), its bad records
    (key, reason) and its documents that fall in the tokenizer's sample (key, text)."""
    out = []
    for piece in pieces:
        keys, chars, bad, sample, lines = [], [], [], [], 0
        for key, text, reason in inputs.records(piece, text_field, None, block):
            lines = key + 1 if key is not None else lines
            if reason is None and text is not None and not text.strip():
                reason = "empty document"
            if reason is not None:
                bad.append((key, reason))
            elif text is not None:
                keys.append(key)
                chars.append(len(text))
                if rate >= 1 or zlib.crc32(text.encode()) < rate * 2 ** 32:
                    sample.append((key, text))
        out.append({"lines": lines, "keys": keys, "chars": chars, "bad": bad, "sample": sample})
    return out


@lru_cache(maxsize=1)
def backend(tokenizer_json: str) -> Any:
    """The tokenizer the driver chose, as the tokenizers library's own object (cached in a task's process)."""
    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_truncation()  # as transformers calls it for add_special_tokens=False and no truncation
    tok.no_padding()
    return tok


def tokenize_task(pieces: list[Piece], first_lines: list[int], moved: tuple | None, text_field: str,
                  val_fraction: float, tokenizer_json: str, eos_id: int, batch_chars: int) -> dict[str, np.ndarray]:
    """The tokens of each split's documents in these pieces, in order, each document followed by EOS. `moved` (a
    piece's index and key) is the document that changes split so that both have one."""
    tok = backend(tokenizer_json)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    batch: list[tuple[str, str]] = []
    eos = np.array([eos_id], dtype=np.int32)

    def flush() -> None:
        for (split, _), encoding in zip(batch, tok.encode_batch_fast([t for _, t in batch], add_special_tokens=False)):
            parts[split] += [np.array(encoding.ids, dtype=np.int32), eos]
        batch.clear()

    held = 0
    for i, (piece, first) in enumerate(zip(pieces, first_lines)):
        for key, text, reason in inputs.records(piece, text_field, None, batch_chars):
            if reason is not None or text is None or not text.strip():
                continue
            val = is_validation(record_name(piece, key, first), val_fraction) != (moved == (i, key))
            batch.append(("val" if val else "train", text))
            held += len(text)
            if held >= batch_chars:
                flush()
                held = 0
    flush()
    return {s: np.concatenate(p) if p else np.zeros(0, dtype=np.int32) for s, p in parts.items()}


@dataclass
class Survey:
    """What the check pass found, in input order: the tasks to tokenize (cut where a corpus reaches max_bytes),
    the first line number of each piece, documents per split, the last of each split and the sample."""
    tasks: list[list[Piece]]
    first_lines: list[list[int]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    last: dict[str, tuple] = field(default_factory=dict)
    sample: list[tuple[tuple, str]] = field(default_factory=list)
    sampled: int = 0
    last_val_text: str | None = None  # the last validation document, kept if sampled: it may have to train


def survey(tasks: list[list[Piece]], cfg: PrepareConfig, bad: Any, workers: Workers, budget: Budget) -> Survey:
    total = sum(p.bytes for t in tasks for p in t)
    limit = cfg.max_bytes if cfg.source in corpora.TEXT else None
    rate = min(1.0, budget.sample_bytes / max(1, min(total, limit or total)))
    found, chars, lines = Survey([]), 0, {}
    progress = Progress("check", min(total, limit or total))
    jobs = [(t, cfg.text_field, rate, budget.task_bytes // 8) for t in tasks]
    for t, (task, results) in enumerate(zip(tasks, workers.map(check_task, jobs))):
        firsts, done = [], False
        for p, (piece, r) in enumerate(zip(task, results)):
            firsts.append(lines.get(piece.uri, 0))
            lines[piece.uri] = firsts[-1] + r["lines"]
            for key, reason in r["bad"]:
                bad.add(record_name(piece, key, firsts[-1]), reason)
            sampled = dict(r["sample"])
            for key, n in zip(r["keys"], r["chars"]):
                split = "val" if is_validation(record_name(piece, key, firsts[-1]), cfg.val_fraction) else "train"
                found.counts[split] += 1
                found.last[split] = (t, p, key)
                bad.seen += 1
                if key in sampled and split == "train" and found.sampled < budget.sample_bytes:
                    found.sample.append(((t, p, key), sampled[key]))
                    found.sampled += len(sampled[key])
                elif split == "val":
                    found.last_val_text = sampled.get(key)
                chars += n
            progress.add(1, piece.bytes, len(r["keys"]), len(r["bad"]))
            if limit is not None and chars >= limit:  # a corpus is read up to max_bytes characters, whole files
                found.tasks.append(task[: p + 1])
                found.first_lines.append(firsts)
                done = True
                break
        if done:
            break
        found.tasks.append(task)
        found.first_lines.append(firsts)
    progress.close()
    return found


def moved(found: Survey) -> tuple | None:
    """As `split` does for media: when one split would be empty, the other's last document moves to it (and out
    of, or into, the tokenizer's sample as it goes)."""
    if not found.counts["val"] and found.counts["train"] > 1:
        doc = found.last["train"]
        if found.sample and found.sample[-1][0] == doc:
            found.sample.pop()
        return doc
    if not found.counts["train"] and found.counts["val"] > 1:
        doc = found.last["val"]
        if found.last_val_text is not None:
            found.sample.append((doc, found.last_val_text))
        return doc
    return None


def prepare_text(fs: pafs.FileSystem, root: str, cfg: PrepareConfig, bad: Any, workers: Workers,
                 shards: Shards) -> dict:
    budget = Budget(cfg.max_memory_mb)
    if 4 * 4 * cfg.rows_per_group * cfg.seq_len > budget.mb * MB // 2:  # a row group's int32 tokens, ~4 copies
        raise ConfigError(f"data.prepare.max_memory_mb: {cfg.max_memory_mb} MB cannot hold a row group of "
                          f"{cfg.rows_per_group} sequences of {cfg.seq_len} tokens; raise it or lower "
                          f"data.prepare.rows_per_group")
    if cfg.source in corpora.TEXT:
        pieces = inputs.corpus_pieces(cfg.source)
    else:
        files = inputs.expand(cfg.inputs, inputs.EXTENSIONS["text"], bad)
        pieces = [piece for uri, size in files for piece in inputs.cut(uri, size, budget.task_bytes)]
    found = survey(inputs.group(pieces, budget.task_bytes), cfg, bad, workers, budget)
    bad.check()  # before any shard is written
    move = moved(found)
    tok = (shared_tokenizer(cfg.tokenizer) if cfg.tokenizer
           else train_tokenizer([text for _, text in found.sample], cfg.vocab_size))
    found.sample.clear()
    eos_id = tok.eos_token_id
    tokenizer_json = tok.backend_tokenizer.to_str()
    if len(found.tasks) > 1 and workers.parallel > 1:
        import ray

        tokenizer_json = ray.put(tokenizer_json)  # once, not once per task
    jobs = [(task, firsts, (move[1], move[2]) if move and move[0] == t else None, cfg.text_field, cfg.val_fraction,
             tokenizer_json, eos_id, budget.batch_chars)
            for t, (task, firsts) in enumerate(zip(found.tasks, found.first_lines))]
    shards.start()
    writers = {s: ShardWriter(shards, s) for s in SPLITS}
    packers = {s: TokenPacker(writers[s], cfg.seq_len) for s in SPLITS}
    progress = Progress("tokenize", sum(p.bytes for t in found.tasks for p in t))
    for task, tokens in zip(found.tasks, workers.map(tokenize_task, jobs)):
        for s in SPLITS:
            packers[s].add(tokens[s])
        progress.add(len(task), sum(p.bytes for p in task), 0)
    progress.close()
    splits = {s: writers[s].close() for s in SPLITS}
    for name, split in splits.items():
        if not split["rows"]:
            raise ConfigError(f"data.prepare: the {name} split packs into no sequence of {cfg.seq_len} tokens; "
                              f"raise data.prepare.max_bytes ({cfg.max_bytes}), add inputs or lower seq_len")
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        fs.create_dir(f"{root}/tokenizer", recursive=True)
        pafs.copy_files(tmp, f"{root}/tokenizer", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        digest = hashlib.sha256(Path(tmp, "tokenizer.json").read_bytes()).hexdigest()
    return {"format": "raypt-tokens/1", "seq_len": cfg.seq_len, "vocab_size": len(tok), "eos_id": eos_id,
            "tokenizer": "tokenizer", "tokenizer_sha256": digest, "documents": sum(found.counts.values()),
            "splits": splits}

