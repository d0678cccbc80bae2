"""Stream a rank's slice of the mixed global order through Ray Data: read tasks read, decode and run ahead.

Each read task covers a window of global batches: it reads every row group it needs once, decodes images and
audio (augmentations seeded by each sample's global position, so a resume repeats them exactly) and emits the
rank's samples in global order. Ray Data runs tasks in parallel, prefetches, and preserves their order. Evaluation
batches of a mix with a labelled image set also carry each image's class, `label` (-1 for unlabelled images).
"""
from __future__ import annotations

import io
import math
import time
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypt import storage
from raypt.data import decode
from raypt.data.features import BATCH_KEY
from raypt.data.manifest import modality, shard_uri
from raypt.data.mix import MixPlan, rank_slots
from raypt.data.order import GlobalOrder
from raypt.data.split import Split

SOURCE_BITS = 40  # sample ids of source s are s << 40 | the id inside the source: unique across a mix
COLUMN = {"text": "input_ids", "image": "image", "audio": "audio"}


def read_rows(uris: list[str], files: np.ndarray, groups: np.ndarray, rows: np.ndarray,
              columns: list[str]) -> pa.Table:
    """Read each needed row group once and return the named rows in the order they were named."""
    keys = files.astype(np.int64) * (1 << 32) + groups
    tables, where, offset = [], np.empty(len(rows), dtype=np.int64), 0
    for key in np.unique(keys):
        sel = np.nonzero(keys == key)[0]
        fs, path = storage.resolve(uris[int(key >> 32)])
        with fs.open_input_file(path) as f:
            group = pq.ParquetFile(f).read_row_group(int(key & 0xFFFFFFFF), columns=["sample_id", *columns])
        tables.append(group.take(rows[sel]))
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


class RankStream:
    """A rank's micro-batches from global batch `first_batch` on, each a dict of tensors in global order, plus
    `weight` (the factor on its mean loss, raypt.data.split) and `position` (each row's source << 40 | place in
    that source's order: what per-sample randomness is keyed by; rows in rank order, which is the rows' order
    for one modality)."""

    def __init__(self, manifests: list[dict], plan: MixPlan, split: str, seed: int, shuffle: bool,
                 batch_split: Split, rank: int, prefetch: int, image_cfg, audio_cfg):
        self.sources = [Source(m, split, seed, shuffle) for m in manifests]
        self.plan, self.seed, self.train = plan, seed, shuffle
        self.batch_split, self.rank, self.prefetch = batch_split, rank, prefetch
        self.image_cfg, self.audio_cfg = image_cfg, audio_cfg
        self.modalities = sorted({s.modality for s in self.sources}, key=list(COLUMN).index)
        self.with_labels = not shuffle and any(s.labelled for s in self.sources)  # for evaluation only
        global_batch = int(plan.counts[0].sum())
        text_only = self.modalities == ["text"]
        block = max(s.order.block_rows() for s in self.sources)
        self.window = max(1, min(math.ceil(block / global_batch), 64 if text_only else 2))

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

    def read_window(self, item: dict) -> dict:
        """Ray Data map: one window of global batches -> this rank's samples of it, decoded, as one row."""
        start, count = int(item["start"][0]), int(item["count"][0])
        srcs, positions = rank_slots(self.plan, start, count, self.batch_split.ranks, self.rank)
        sample_ids = np.empty(len(srcs), dtype=np.int64)
        parts: dict[str, list] = {mod: [] for mod in self.modalities}
        labels: list = []
        for s in np.unique(srcs):
            sel = np.nonzero(srcs == s)[0]
            source = self.sources[s]
            labelled = self.with_labels and source.labelled
            table = read_rows(source.uris, *source.order.locate(positions[sel]),
                              [COLUMN[source.modality], *(["label"] if labelled else [])])
            sample_ids[sel] = (int(s) << SOURCE_BITS) | table.column("sample_id").to_numpy()
            parts[source.modality].append((sel, self.decode(int(s), positions[sel], table)))
            if self.with_labels and source.modality == "image":
                labels.append((sel, table.column("label").to_numpy() if labelled
                               else np.full(len(sel), -1, dtype=np.int64)))
        window = {"sample_id": sample_ids, "source": srcs, "position": (srcs << SOURCE_BITS) | positions}
        for mod, pieces in parts.items():
            window[BATCH_KEY[mod]] = in_rank_order(pieces, self.empty(mod))
        if self.with_labels:  # beside the images, in their order
            window["label"] = in_rank_order(labels, np.zeros(0, dtype=np.int64))
        buf = io.BytesIO()  # one row, as an .npz: a window's modalities have different row counts
        np.savez(buf, **window)
        return {"window": np.array([buf.getvalue()], dtype=object)}

    def micro_batches(self, window: dict) -> Iterator[dict]:
        """The window's rows, batch by batch, cut into the rank's micro-batches (a zero-weight filler's sample id
        is -1)."""
        import torch

        modality_of = np.array([self.sources[s].modality for s in window["source"]])
        share = self.batch_split.share(self.rank)[1]
        for first in range(0, len(modality_of), share):
            for rows, weight in self.batch_split.micro_slices(self.rank):
                lo, hi = first + rows.start, first + rows.stop
                ids = window["sample_id"][lo:hi] if weight else np.array([-1])
                batch = {"sample_id": torch.from_numpy(ids), "position": torch.from_numpy(window["position"][lo:hi]),
                         "weight": weight}
                for mod in self.modalities:
                    before = int(np.sum(modality_of[:lo] == mod))
                    rows = slice(before, before + int(np.sum(modality_of[lo:hi] == mod)))
                    batch[BATCH_KEY[mod]] = torch.from_numpy(window[BATCH_KEY[mod]][rows])
                    if mod == "image" and self.with_labels:
                        batch["label"] = torch.from_numpy(window["label"][rows])
                yield batch

    def batches(self, first_batch: int, num_batches: int) -> Iterator[dict]:
        import ray.data

        starts = range(first_batch, first_batch + num_batches, self.window)
        items = [{"start": s, "count": min(self.window, first_batch + num_batches - s)} for s in starts]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.execution_options.preserve_order = True
        # Two read tasks at most: one ahead of the consumer is enough, and each new task process costs CPU
        # that the training ranks need.
        ds = ds.map_batches(self.read_window, batch_size=1, num_cpus=0.25,
                            compute=ray.data.TaskPoolStrategy(size=min(2, len(items))))
        for row in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch):
            for packed in row["window"]:
                with np.load(io.BytesIO(packed), allow_pickle=False) as window:
                    yield from self.micro_batches(dict(window))


class Timed:
    """A rank's batch iterator that counts the seconds spent waiting for batches and keeps their sample ids."""

    def __init__(self, batches: Iterator[dict]):
        self.batches = batches
        self.reset()

    def reset(self) -> None:
        self.wait, self.ids = 0.0, []

    def __iter__(self) -> "Timed":
        return self

    def __next__(self) -> dict:
        t = time.perf_counter()
        batch = next(self.batches)
        self.wait += time.perf_counter() - t
        ids = batch.pop("sample_id")
        self.ids.append(ids[ids >= 0])  # not a zero-weight filler's
        return batch
