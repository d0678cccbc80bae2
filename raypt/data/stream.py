"""Stream a rank's slice of the global order through Ray Data: read tasks run ahead with backpressure.

Each read task covers a window of global batches, reads every row group it needs once, and emits the rank's rows
in global order; Ray Data runs tasks in parallel, prefetches, and preserves their order.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypt import storage
from raypt.data.manifest import shard_uri
from raypt.data.order import GlobalOrder, rank_positions


def read_rows(uris: list[str], files: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> dict:
    """Read each needed row group once and return the named rows in the order they were named."""
    keys = files.astype(np.int64) * (1 << 32) + groups
    tables, where, offset = [], np.empty(len(rows), dtype=np.int64), 0
    for key in np.unique(keys):
        sel = np.nonzero(keys == key)[0]
        fs, path = storage.resolve(uris[int(key >> 32)])
        with fs.open_input_file(path) as f:
            tables.append(pq.ParquetFile(f).read_row_group(int(key & 0xFFFFFFFF)).take(rows[sel]))
        where[sel] = offset + np.arange(len(sel))
        offset += len(sel)
    table = pa.concat_tables(tables).take(where)
    ids = table.column("input_ids").combine_chunks()
    return {"sample_id": table.column("sample_id").to_numpy(),
            "input_ids": ids.flatten().to_numpy().reshape(len(ids), -1).astype(np.int64)}


class RankStream:
    """A rank's batches from global batch `first_batch` on: micro-batches of `micro` rows, in global order."""

    def __init__(self, manifest: dict, split: str, seed: int, shuffle: bool, global_batch: int, world: int,
                 rank: int, micro: int, prefetch: int):
        self.order = GlobalOrder(manifest, split, seed, shuffle)
        self.uris = [shard_uri(manifest, f) for f in self.order.files]
        self.global_batch, self.world, self.rank, self.micro, self.prefetch = global_batch, world, rank, micro, prefetch
        self.window = max(1, math.ceil(self.order.block_rows() / global_batch))

    def read_window(self, item: dict) -> dict:
        """Ray Data map: one window of global batches -> this rank's rows of it."""
        start, count = int(item["start"][0]), int(item["count"][0])
        positions = rank_positions(start, count, self.global_batch, self.world, self.rank)
        return read_rows(self.uris, *self.order.locate(positions))

    def batches(self, first_batch: int, num_batches: int) -> Iterator[dict]:
        import ray.data
        import torch  # here, not at module level: read tasks unpickle this module and need no torch

        starts = range(first_batch, first_batch + num_batches, self.window)
        items = [{"start": s, "count": min(self.window, first_batch + num_batches - s)} for s in starts]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds.context.execution_options.preserve_order = True
        # Two read tasks at most: one ahead of the consumer is enough, and each new task process costs CPU
        # that the training ranks need.
        ds = ds.map_batches(self.read_window, batch_size=1, num_cpus=0.25,
                            compute=ray.data.TaskPoolStrategy(size=min(2, len(items))))
        # Whole windows cross the object store; slicing micro-batches here costs no per-batch Ray work.
        for window in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch):
            for i in range(0, len(window["sample_id"]), self.micro):
                yield {k: torch.tensor(v[i:i + self.micro]) for k, v in window.items()}
