"""Evaluation: each source's validation loss on batches of its own, and the mix's at the weights of the step.

Every source a job evaluates (the mix's, then `data.eval_sources`) has train.eval_batches global batches of its
validation split alone, the same ones at every evaluation; `val_loss/<name>` is the mean loss over their samples.
The mixed `val_loss` weights the mix's sources by the weights in force at the step, so it follows data.stages and
a source at weight 0 adds nothing; evaluation-only datasets never enter it. A run on data.path alone has the one
source `main`, whose batches are those the run evaluated before per-source losses: its val_loss is unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from raypt.config import JobConfig
from raypt.data.manifest import read_manifest
from raypt.data.mix import MixPlan
from raypt.data.stream import rank_stream
from raypt.metrics import Reducer, source_losses


def mixed(losses: list[float], weights: list[float]) -> float:
    """The mix's loss: the sources' losses weighted by their (relative) weights. The weights are normalized before
    they multiply, so a mix of one source is that source's loss exactly."""
    shares = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
    return float(sum(p * v for p, v in zip(shares, losses) if p))


class Evaluator:
    """A rank's part of every evaluation: each source's validation batches, and the run's metrics of a model on
    them."""

    def __init__(self, cfg: JobConfig, manifests: list[dict], engine: Any, loss: Callable, feed: Any = None):
        """`manifests`: the mix's, in mix order (those of the evaluation-only datasets are read here); `feed`: the
        run's (raypt/data/feed.py)."""
        self.cfg, self.engine, self.loss, self.feed = cfg, engine, loss, feed
        self.manifests = [*manifests, *(read_manifest(s.path) for s in cfg.data.eval_sources)]
        self.metrics = source_losses(cfg.data.evaluated())
        self.reduce = Reducer(self.metrics)
        self.weights = [w for _, w in cfg.data.stage_weights()]  # stage by stage, as the training plan's stages

    def batches(self) -> list[list[dict]]:
        """This rank's micro-batches of every source's validation batches, source by source (read once, kept)."""
        c, e = self.cfg, self.engine
        out = []
        for source in np.eye(len(self.manifests)):
            # A mix of every source with all the weight on one: its batches carry each modality as training
            # batches do (empty where the source has none), and rows keep their source in `position`.
            plan = MixPlan([(0, source)], c.train.global_batch, np.zeros(len(source)))  # one stage: no tokens
            stream = rank_stream(e, self.manifests, plan, "val", c.run.seed, False, c.data, self.feed)
            out.append(list(stream.batches(0, c.train.eval_batches)))
        return out

    def __call__(self, val: list[list[dict]], stage: int) -> dict[str, float]:
        """`val_loss` (the mix weighted as in the training plan's stage `stage`) and every `val_loss/<name>`."""
        losses = self.reduce({m.name: self.mean_loss(b) for m, b in zip(self.metrics, val)}, self.engine.device)
        mix = [losses[m.name] for m in self.metrics[:len(self.weights[stage])]]
        return {"val_loss": mixed(mix, self.weights[stage]), **losses}

    def mean_loss(self, batches: list[dict]) -> float:
        """This rank's part of the mean over every sample of `batches`: micro-batches weighted by their rows, as in
        training (raypt/data/split.py), so the ranks' mean is the mean over the samples."""
        return sum(b["weight"] * self.engine.eval_step({k: v for k, v in b.items() if k != "weight"},
                                                       self.loss)[0].item() for b in batches) / len(batches)
