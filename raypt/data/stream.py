"""A rank's slice of the mixed global order, fed through Ray's object store from reads shared by every rank.

The run's feed (raypt/data/feed.py) reads each shuffle block from storage once for every rank and starts one
task per rank and window that takes the rank's rows from those blocks and decodes them (raypt/data/window.py).
Each rank asks for its windows ahead of use and cuts them into its micro-batches here.
"""
from __future__ import annotations

import io
import time
from collections import deque
from typing import Any, Iterator

import numpy as np

from raypt.data.features import BATCH_KEY
from raypt.data.feed import Feed, call, fetch
from raypt.data.mix import MixPlan
from raypt.data.split import Split
from raypt.data.window import SOURCE_BITS, Mix

# SOURCE_BITS: how a batch's sample ids name their source
__all__ = ["RankStream", "Blank", "rank_stream", "Timed", "SOURCE_BITS"]


class RankStream:
    """A rank's micro-batches from global batch `first_batch` on, each a dict of tensors in global order, plus
    `weight` (the factor on its mean loss, raypt.data.split) and `position` (each row's source << 40 | place in
    that source's order: what per-sample randomness is keyed by; rows in rank order, which is the rows' order
    for one modality). `feed`: the run's feed actor, shared by its ranks; None = a feed of this process's own."""

    def __init__(self, manifests: list[dict], plan: MixPlan, split: str, seed: int, shuffle: bool,
                 batch_split: Split, rank: int, prefetch: int, image_cfg, audio_cfg, feed: Any = None,
                 readers: int = 1):
        """`readers`: ranks that read this data-parallel rank's batches, to whom the feed hands one window."""
        self.mix = Mix(manifests, plan, split, seed, shuffle, image_cfg, audio_cfg)
        self.batch_split, self.rank, self.prefetch, self.readers = batch_split, rank, prefetch, readers
        self.feed = feed if feed is not None else Feed()

    def micro_batches(self, window: dict) -> Iterator[dict]:
        """The window's rows, batch by batch, cut into the rank's micro-batches (a zero-weight filler's sample id
        is -1)."""
        import torch

        modality_of = np.array([self.mix.sources[s].modality for s in window["source"]])
        share = self.batch_split.share(self.rank)[1]
        for first in range(0, len(modality_of), share):
            for rows, weight in self.batch_split.micro_slices(self.rank):
                lo, hi = first + rows.start, first + rows.stop
                ids = window["sample_id"][lo:hi] if weight else np.array([-1])
                batch = {"sample_id": torch.from_numpy(ids), "position": torch.from_numpy(window["position"][lo:hi]),
                         "weight": weight}
                for mod in self.mix.modalities:
                    before = int(np.sum(modality_of[:lo] == mod))
                    rows = slice(before, before + int(np.sum(modality_of[lo:hi] == mod)))
                    batch[BATCH_KEY[mod]] = torch.from_numpy(window[BATCH_KEY[mod]][rows])
                    if mod == "image" and self.mix.with_labels:
                        batch["label"] = torch.from_numpy(window["label"][rows])
                yield batch

    def batches(self, first_batch: int, num_batches: int) -> Iterator[dict]:
        end, world = first_batch + num_batches, self.batch_split.ranks
        windows = deque((s, min(self.mix.window, end - s)) for s in range(first_batch, end, self.mix.window))
        call(self.feed, "open", self.mix)
        ahead: deque = deque()
        while windows or ahead:
            # `prefetch` windows asked for beyond the one in use: each is read and decoded while the rank trains.
            while windows and len(ahead) <= self.prefetch:
                start, count = windows.popleft()
                ahead.append(call(self.feed, "window", self.mix.key, start, count, world, self.rank, self.readers))
            with np.load(io.BytesIO(fetch(ahead.popleft())), allow_pickle=False) as window:
                yield from self.micro_batches(dict(window))


class Blank:
    """The batches of a rank that reads none (a pipeline's middle stage): each micro-batch's weight, no rows."""

    def __init__(self, batch_split: Split, rank: int):
        self.batch_split, self.rank = batch_split, rank

    def batches(self, first_batch: int, num_batches: int) -> Iterator[dict]:
        import torch

        for _ in range(num_batches):
            for _, weight in self.batch_split.micro_slices(self.rank):
                yield {"sample_id": torch.zeros(0, dtype=torch.int64), "weight": weight}


def rank_stream(engine: Any, manifests: list[dict], plan: MixPlan, split: str, seed: int, shuffle: bool,
                data_cfg: Any, feed: Any = None) -> RankStream | Blank:
    """The stream of an engine's rank: its data-parallel rank's share of `split`, or blanks where the rank reads
    no data. `data_cfg`: the job's `data` section."""
    if not engine.consumes_data:
        return Blank(engine.split, engine.dp_rank)
    return RankStream(manifests, plan, split, seed, shuffle, engine.split, engine.dp_rank, data_cfg.prefetch_batches,
                      data_cfg.image, data_cfg.audio, feed, engine.readers)


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
