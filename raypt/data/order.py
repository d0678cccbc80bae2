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

    def blocks(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global positions -> (epoch, shuffle block of that epoch, place in the block's order)."""
        epochs, offsets = np.divmod(positions, self.rows)
        blocks, places = np.empty_like(epochs), np.empty_like(epochs)
        for epoch in np.unique(epochs):
            sel = np.nonzero(epochs == epoch)[0]
            block_starts = self._layout(int(epoch))[2]
            blocks[sel] = np.searchsorted(block_starts, offsets[sel], side="right") - 1
            places[sel] = offsets[sel] - block_starts[blocks[sel]]
        return epochs, blocks, places

    def block(self, epoch: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A shuffle block as storage holds it: its chunks' (file, row group) in the epoch's chunk order, and the
        row of those chunks' concatenation at each place of the block's order."""
        perm = self._layout(epoch)[0]
        chunks = perm[block * self.block_chunks:(block + 1) * self.block_chunks]  # blocks start at chunk starts
        rows = self._block_rows(epoch, block, self.block_size(epoch, block))
        return self.chunk_file[chunks], self.chunk_group[chunks], rows

    def block_size(self, epoch: int, block: int) -> int:
        block_starts = self._layout(epoch)[2]
        return int(block_starts[block + 1] - block_starts[block])

    def block_end(self, epoch: int, block: int) -> int:
        """The position just past a block: once a source has given that many samples, nothing needs the block."""
        return epoch * self.rows + int(self._layout(epoch)[2][block + 1])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Global positions -> (file index, row group, row inside the group)."""
        files, groups, rows = (np.empty(len(positions), dtype=np.int64) for _ in range(3))
        epochs, blocks, places = self.blocks(positions)
        for epoch, block in {(int(e), int(b)) for e, b in zip(epochs, blocks)}:
            sel = np.nonzero((epochs == epoch) & (blocks == block))[0]
            perm, chunk_starts, block_starts = self._layout(epoch)
            shuffled = block_starts[block] + self._block_rows(epoch, block, self.block_size(epoch, block))[places[sel]]
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
