"""The global sample order: a pure function of (seed, epoch, manifest), so any world size can resume it exactly.

Position P (a count of global samples consumed) lies in epoch P // N. Each epoch permutes the row groups
("chunks") of the split, cuts them into shuffle blocks of `block_chunks` chunks, and permutes the rows of each
block: batches mix many documents while a reader touches only one block's row groups at a time.
Rank r of n takes rows [r*G/n, (r+1)*G/n) of every global batch of G samples.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


class GlobalOrder:
    def __init__(self, manifest: dict, split: str, seed: int, shuffle: bool = True, block_chunks: int = 16):
        files = manifest["splits"][split]["files"]
        pairs = [(fi, gi, n) for fi, f in enumerate(files) for gi, n in enumerate(f["row_groups"])]
        self.files = files
        self.chunk_file, self.chunk_group, self.chunk_rows = (np.array(c) for c in zip(*pairs))
        self.rows = int(self.chunk_rows.sum())
        self.seed, self.shuffle = seed, shuffle
        self.block_chunks = block_chunks if shuffle else 1

    @lru_cache(maxsize=4)
    def _layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk order of an epoch, each chunk's first position, and each block's first position."""
        n = len(self.chunk_rows)
        perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        chunk_starts = np.concatenate([[0], np.cumsum(self.chunk_rows[perm])])
        block_starts = chunk_starts[::self.block_chunks]
        if block_starts[-1] != self.rows:
            block_starts = np.append(block_starts, self.rows)
        return perm, chunk_starts, block_starts

    @lru_cache(maxsize=8)
    def _block_rows(self, epoch: int, block: int, size: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(size)
        return np.random.default_rng([self.seed, epoch, block]).permutation(size)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global positions -> (file index, row group, row inside the group)."""
        epochs, offsets = np.divmod(positions, self.rows)
        files, groups, rows = (np.empty(len(positions), dtype=np.int64) for _ in range(3))
        for epoch in np.unique(epochs):
            sel = np.nonzero(epochs == epoch)[0]
            perm, chunk_starts, block_starts = self._layout(int(epoch))
            block = np.searchsorted(block_starts, offsets[sel], side="right") - 1
            shuffled = offsets[sel].copy()
            for b in np.unique(block):
                here = block == b
                start, end = block_starts[b], block_starts[b + 1]
                perm_rows = self._block_rows(int(epoch), int(b), int(end - start))
                shuffled[here] = start + perm_rows[offsets[sel][here] - start]
            slot = np.searchsorted(chunk_starts, shuffled, side="right") - 1
            chunk = perm[slot]
            files[sel], groups[sel] = self.chunk_file[chunk], self.chunk_group[chunk]
            rows[sel] = shuffled - chunk_starts[slot]
        return files, groups, rows

    def block_rows(self) -> int:
        return int(self.chunk_rows.max()) * self.block_chunks


def rank_positions(first_batch: int, num_batches: int, global_batch: int, world: int, rank: int) -> np.ndarray:
    """The global positions rank `rank` of `world` consumes over a run of global batches, in order."""
    per_rank = global_batch // world
    batches = np.arange(first_batch, first_batch + num_batches, dtype=np.int64)[:, None]
    return (batches * global_batch + rank * per_rank + np.arange(per_rank, dtype=np.int64)[None, :]).reshape(-1)
