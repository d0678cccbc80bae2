"""What a window of a stream is: the mix it reads, the shuffle blocks it lies in, and one rank's rows of it,
decoded and packed (what the feed's tasks compute, raypt/data/feed.py).

Augmentations are seeded by each sample's global position, so a resume repeats them exactly; each sample is
decoded once, by the task of the one rank that takes it. Evaluation windows of a mix with a labelled image set
also carry each image's class, `label` (-1 for unlabelled images).
"""
from __future__ import annotations

import hashlib
import io
import math
import pickle
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypt import storage
from raypt.data import decode
from raypt.data.features import BATCH_KEY
from raypt.data.manifest import modality, shard_uri
from raypt.data.mix import MixPlan, rank_slots
from raypt.data.order import GlobalOrder

SOURCE_BITS = 40  # sample ids of source s are s << 40 | the id inside the source: unique across a mix
COLUMN = {"text": "input_ids", "image": "image", "audio": "audio"}
MEDIA_WINDOW = 256  # samples of a global batch's images or audio per window
BlockKey = tuple[int, int, int]  # (source, epoch, shuffle block)
ChunkKey = tuple[int, int, int]  # (source, file, row group)


def read_chunk(uri: str, group: int, columns: list[str]) -> pa.Table:
    """One row group: the unit of storage reads, the same in every epoch."""
    fs, path = storage.resolve(uri)
    with fs.open_input_file(path) as f:
        return pq.ParquetFile(f).read_row_group(group, columns=columns)


def gather(chunks: dict[ChunkKey, pa.Table], src: int, files: np.ndarray, groups: np.ndarray,
           rows: np.ndarray) -> pa.Table:
    """The named rows of source `src`'s row groups, in the order they were named."""
    keys = files * (1 << 32) + groups
    tables, where, offset = [], np.empty(len(keys), dtype=np.int64), 0
    for key in np.unique(keys):
        sel = np.nonzero(keys == key)[0]
        tables.append(chunks[(src, int(key >> 32), int(key & 0xFFFFFFFF))].take(rows[sel]))
        where[sel] = offset + np.arange(len(sel))
        offset += len(sel)
    return pa.concat_tables(tables).take(where)


def in_rank_order(pieces: list[tuple[np.ndarray, np.ndarray]], empty: np.ndarray) -> np.ndarray:
    """One array of (rows' places in the rank's window, their arrays) pieces, rows in the rank's order; `empty`
    when there are none."""
    if not pieces:
        return empty
    rows = np.concatenate([sel for sel, _ in pieces])
    return np.concatenate([a for _, a in pieces])[np.argsort(rows, kind="stable")]


class Source:
    """One prepared dataset in the mix: its sample order and how its rows become arrays."""

    def __init__(self, manifest: dict, split: str, seed: int, shuffle: bool):
        self.modality = modality(manifest)
        self.order = GlobalOrder(manifest, split, seed, shuffle)
        self.uris = [shard_uri(manifest, f) for f in self.order.files]
        self.root = manifest["root"]
        self.seq_len = manifest.get("seq_len", 0)
        self.labelled = bool(manifest.get("labels"))
        self.columns = ["sample_id", COLUMN[self.modality], *(["label"] if self.labelled else [])]


class Mix:
    """What a stream is, the same on every rank and in every task: the sources, the plan, and how rows become
    arrays. `key` names it, so that every rank's requests share one feed stream."""

    def __init__(self, manifests: list[dict], plan: MixPlan, split: str, seed: int, shuffle: bool,
                 image_cfg: Any, audio_cfg: Any):
        self.sources = [Source(m, split, seed, shuffle) for m in manifests]
        self.plan, self.seed, self.train = plan, seed, shuffle
        self.image_cfg, self.audio_cfg = image_cfg, audio_cfg
        self.modalities = sorted({s.modality for s in self.sources}, key=list(COLUMN).index)
        self.with_labels = not shuffle and any(s.labelled for s in self.sources)  # for evaluation only
        global_batch = int(plan.counts[0].sum())
        block = max(s.order.block_rows() for s in self.sources)
        # Windows of text span a shuffle block (few, large objects); decoded images and audio are large, so their
        # windows hold about MEDIA_WINDOW samples: few tasks per step, and a rank's read-ahead small in memory.
        longest = 64 if self.modalities == ["text"] else math.ceil(MEDIA_WINDOW / global_batch)
        self.window = max(1, min(math.ceil(block / global_batch), longest))
        what = (manifests, split, seed, shuffle, plan.first_batch, [c.tolist() for c in plan.counts],
                image_cfg.model_dump(), audio_cfg.model_dump())
        self.key = hashlib.sha256(pickle.dumps(what)).hexdigest()[:16]

    def needs(self, start: int, count: int, world: int, rank: int) -> tuple[list[BlockKey], list[ChunkKey]]:
        """The shuffle blocks rank `rank`'s rows of a window lie in, and the row groups that hold them."""
        srcs, positions = rank_slots(self.plan, start, count, world, rank)
        blocks, chunks = set(), set()
        for s in np.unique(srcs):
            order = self.sources[s].order
            epochs, ids, _ = order.blocks(positions[srcs == s])
            blocks |= {(int(s), int(e), int(b)) for e, b in zip(epochs, ids)}
            files, groups, _ = order.locate(positions[srcs == s])
            chunks |= {(int(s), int(f), int(g)) for f, g in zip(files, groups)}
        return sorted(blocks), sorted(chunks)

    def chunks_of(self, key: BlockKey) -> set[ChunkKey]:
        files, groups, _ = self.sources[key[0]].order.block(*key[1:])
        return {(key[0], int(f), int(g)) for f, g in zip(files, groups)}

    def read(self, key: ChunkKey) -> pa.Table:
        source = self.sources[key[0]]
        return read_chunk(source.uris[key[1]], key[2], source.columns)

    def decode(self, src: int, positions: np.ndarray, table: pa.Table) -> np.ndarray:
        source = self.sources[src]
        if source.modality == "text":
            ids = table.column("input_ids").combine_chunks()
            return ids.flatten().to_numpy().reshape(len(ids), -1).astype(np.int64)
        out, ids, encoded = [], table.column("sample_id").to_numpy(), table.column(COLUMN[source.modality])
        for pos, sid, data in zip(positions, ids, encoded.to_pylist()):
            rng = np.random.default_rng([self.seed, src, int(pos)]) if self.train else None
            try:
                out.append(self.image(data, rng) if source.modality == "image"
                           else decode.audio_features(data, self.audio_cfg, rng))
            except decode.BadRecord as e:
                raise decode.BadRecord(f"{source.root}: sample {int(sid)} no longer decodes ({e}); "
                                       f"it passed `raypt data prepare`, so the shard changed since") from None
        return np.stack(out)

    def image(self, data: bytes, rng) -> np.ndarray:
        views = decode.image_views(data, self.image_cfg, rng)
        return views[0] if self.image_cfg.views == 1 else views

    def empty(self, mod: str) -> np.ndarray:
        """A modality's zero-row array: every rank's micro-batch carries every modality of the mix."""
        if mod == "text":
            return np.zeros((0, max(s.seq_len for s in self.sources)), dtype=np.int64)
        if mod == "image":
            size, views = self.image_cfg.size, self.image_cfg.views
            return np.zeros((0, *((views,) if views > 1 else ()), 3, size, size), dtype=np.float32)
        return np.zeros((0, self.audio_cfg.n_mels, decode.audio_frames(self.audio_cfg)), dtype=np.float32)

    def assemble(self, start: int, count: int, world: int, rank: int, chunks: dict[ChunkKey, pa.Table]) -> bytes:
        """Rank `rank`'s samples of global batches [start, start + count), decoded, as one .npz (a window's
        modalities have different row counts)."""
        srcs, positions = rank_slots(self.plan, start, count, world, rank)
        sample_ids = np.empty(len(srcs), dtype=np.int64)
        parts: dict[str, list] = {mod: [] for mod in self.modalities}
        labels: list = []
        for s in np.unique(srcs):
            sel = np.nonzero(srcs == s)[0]
            source = self.sources[s]
            table = gather(chunks, int(s), *source.order.locate(positions[sel]))
            sample_ids[sel] = (int(s) << SOURCE_BITS) | table.column("sample_id").to_numpy()
            parts[source.modality].append((sel, self.decode(int(s), positions[sel], table)))
            if self.with_labels and source.modality == "image":
                labels.append((sel, table.column("label").to_numpy() if source.labelled
                               else np.full(len(sel), -1, dtype=np.int64)))
        window = {"sample_id": sample_ids, "source": srcs, "position": (srcs << SOURCE_BITS) | positions}
        for mod, pieces in parts.items():
            window[BATCH_KEY[mod]] = in_rank_order(pieces, self.empty(mod))
        if self.with_labels:  # beside the images, in their order
            window["label"] = in_rank_order(labels, np.zeros(0, dtype=np.int64))
        buf = io.BytesIO()
        np.savez(buf, **window)
        return buf.getvalue()

    def read_window(self, start: int, count: int, world: int, rank: int) -> bytes:
        """`assemble` with the row groups read in this process: what a window task does, without Ray."""
        return self.assemble(start, count, world, rank,
                             {k: self.read(k) for k in self.needs(start, count, world, rank)[1]})
