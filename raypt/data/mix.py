"""Mixing datasets by weight as exact per-global-batch counts, with weights that change at given token counts.

Every figure here is a pure function of the batch index, so the samples of batch b (and how many each source has
given before it) are known without replaying the run: a resume at any world size lands on the same samples.
"""
from __future__ import annotations

import math

import numpy as np

from raypt.data.split import Split


def allocate(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total` in proportion to `weights`: largest remainder (deterministic)."""
    share = np.asarray(weights, dtype=np.float64) / float(np.sum(weights)) * total
    counts = np.floor(share).astype(np.int64)
    short = total - int(counts.sum())
    order = sorted(range(len(share)), key=lambda i: (-(share[i] - counts[i]), i))
    counts[order[:short]] += 1
    return counts


def interleave(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slots of one global batch: (source, index within the source's share), spread so each rank's slice is mixed."""
    src = np.concatenate([np.full(c, s) for s, c in enumerate(counts)]).astype(np.int64)
    idx = np.concatenate([np.arange(c) for c in counts]).astype(np.int64)
    key = (idx + 0.5) / np.maximum(counts[src], 1)
    order = np.lexsort((src, key))
    return src[order], idx[order]


class MixPlan:
    """Sources' counts per global batch, stage by stage; a stage starts at the first batch with its tokens seen."""

    def __init__(self, stages: list[tuple[int, np.ndarray]], global_batch: int, tokens_per_sample: np.ndarray):
        """`stages`: (at_tokens, weights) pairs, the first at 0."""
        self.tokens_per_sample = np.asarray(tokens_per_sample, dtype=np.int64)
        self.first_batch, self.counts, self.tokens_at, self.consumed_at = [], [], [], []
        batch, tokens, consumed = 0, 0, np.zeros(len(self.tokens_per_sample), dtype=np.int64)
        for at_tokens, weights in stages:
            if self.counts:
                per_batch = int(self.counts[-1] @ self.tokens_per_sample)
                span = max(0, math.ceil((at_tokens - tokens) / per_batch))
                batch, tokens, consumed = batch + span, tokens + span * per_batch, consumed + span * self.counts[-1]
            self.first_batch.append(batch)
            self.counts.append(allocate(weights, global_batch))
            self.tokens_at.append(tokens)
            self.consumed_at.append(consumed.copy())

    def stage(self, batch: int) -> int:
        return int(np.searchsorted(self.first_batch, batch, side="right") - 1)

    def consumed(self, batch: int) -> np.ndarray:
        """Samples each source has given before global batch `batch`."""
        s = self.stage(batch)
        return self.consumed_at[s] + (batch - self.first_batch[s]) * self.counts[s]

    def tokens_before(self, batch: int) -> int:
        s = self.stage(batch)
        return int(self.tokens_at[s] + (batch - self.first_batch[s]) * (self.counts[s] @ self.tokens_per_sample))

    def slots(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `batch` in global order: each slot's source and its position in that source's sample order."""
        s = self.stage(batch)
        src, idx = interleave(self.counts[s])
        return src, self.consumed(batch)[src] + idx


def rank_slots(plan: MixPlan, first_batch: int, num_batches: int, world: int, rank: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """(source, position) of every sample rank `rank` of `world` takes over a run of global batches, in order:
    its share of each batch (raypt.data.split)."""
    srcs, positions = [], []
    for b in range(first_batch, first_batch + num_batches):
        src, pos = plan.slots(b)
        start, count = Split(len(src), world, 1).share(rank)
        srcs.append(src[start:start + count])
        positions.append(pos[start:start + count])
    return np.concatenate(srcs), np.concatenate(positions)
