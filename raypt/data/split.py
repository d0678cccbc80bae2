"""How one global batch is shared by the data-parallel ranks, at any world size.

Rank r of W takes a contiguous slice of the batch's global order: G // W samples, one more for the first G % W
ranks. Every rank runs the same number of micro-batches A = ceil(ceil(G / W) / micro), as DeepSpeed's collectives
need, with its rows spread evenly over them. DeepSpeed averages the micro-batch losses over A and over the W
ranks; weighting the mean loss of a micro-batch of n rows by n * A * W / G turns that average into the mean over
the batch's G samples, so the update is the same at every world size (and equals the old equal split where W
divides G / micro).

A rank whose share is shorter than A rows (micro_batch 1 and an uneven split) fills its last micro-batches with a
repeated row of weight 0: it calls the model as often as its peers, which ZeRO-3's parameter gathers require.
DeepSpeed's own check, train_batch_size = micro x A x W, is given the padded figure (`nominal_batch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Split:
    global_batch: int
    ranks: int
    micro: int
    micro_batches: int = 0  # a pipeline's fixed count per step (its micro-batches then take up to `micro` rows)

    def __post_init__(self) -> None:
        if self.global_batch < self.ranks:
            raise ValueError(f"train.global_batch: {self.global_batch} is smaller than the {self.ranks} "
                             f"data-parallel ranks; every rank needs at least one sample per step")

    def share(self, rank: int) -> tuple[int, int]:
        """(first slot, number of slots) of rank `rank` in each global batch."""
        base, extra = divmod(self.global_batch, self.ranks)
        return rank * base + min(rank, extra), base + (rank < extra)

    @classmethod
    def fixed(cls, global_batch: int, ranks: int, micro_batches: int) -> "Split":
        """`micro_batches` per rank and step, each of at most the rows the largest share needs (a pipeline sends
        activations of one shape, so its engine pads each micro-batch to `micro` rows at weight 0)."""
        return cls(global_batch, ranks, math.ceil(math.ceil(global_batch / ranks) / micro_batches), micro_batches)

    @property
    def accumulation(self) -> int:
        """Micro-batches every rank runs per optimizer step."""
        return self.micro_batches or math.ceil(math.ceil(self.global_batch / self.ranks) / self.micro)

    @property
    def nominal_batch(self) -> int:
        """What DeepSpeed counts as the batch: micro x accumulation x ranks, padding included."""
        return self.micro * self.accumulation * self.ranks

    def micro_slices(self, rank: int) -> list[tuple[slice, float]]:
        """Each of the rank's micro-batches in one step: the rows of its share it takes, and its weight. Real rows
        are spread evenly; a filler (when the share has fewer rows than micro-batches) repeats the share's last row
        at weight 0."""
        rows = self.share(rank)[1]
        base, extra = divmod(rows, self.accumulation)
        out, start = [], 0
        for i in range(self.accumulation):
            n = base + (i < extra)
            out.append((slice(start, start + n), self.weight(n)) if n else (slice(rows - 1, rows), 0.0))
            start += n
        return out

    def weight(self, rows: int) -> float:
        """The factor on the mean loss of a micro-batch with `rows` real rows."""
        return rows * self.accumulation * self.ranks / self.global_batch
