"""What a contrastive encoder's features are worth, at every evaluation: a linear probe and a k-NN classifier on
frozen features of the labelled image set, the standard protocol of SimCLR and AMCL at small scale.

Both fit on the features of the whole training split and score on the whole validation split, each image seen
once, unaugmented (the evaluation view). The linear probe is scikit-learn's multinomial logistic regression on
standardised features; the k-NN vote is by cosine similarity among the training features. Each rank encodes its
share of the images through the engine (ZeRO-3 gathers weights as in training); rank 0 gathers the features, fits
and reports `probe_acc` and `knn_acc` (and so to Tune)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from raypt.data.mix import MixPlan
from raypt.data.order import GlobalOrder
from raypt.data.stream import RankStream
from raypt.hooks.base import Hook
from raypt.metrics import Metric

Labelled = tuple[np.ndarray, np.ndarray]  # features [n, d], labels [n]


def linear_probe(train: Labelled, test: Labelled, seed: int = 0) -> float:
    """Accuracy on `test` of a logistic regression fitted on `train` (features standardised by train's)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=seed))
    return float(probe.fit(*train).score(*test))


def knn_accuracy(train: Labelled, test: Labelled, k: int) -> float:
    """Accuracy on `test` of a majority vote among each row's k most cosine-similar rows of `train`."""
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(n_neighbors=min(k, len(train[1])), metric="cosine").fit(*train).score(*test))


class Probe(Hook):
    metrics = (
        Metric("probe_acc", "rank0", "validation accuracy of a linear probe (logistic regression) on frozen "
               "encoder features of the labelled training split"),
        Metric("knn_acc", "rank0", "validation accuracy of a cosine k-NN vote (model.knn_k) among the training "
               "split's frozen features"),
    )

    def __init__(self, k: int):
        self.k = k
        self.sets: Optional[dict[str, list[dict]]] = None  # split -> this rank's micro-batches, read once

    def start(self, loop: Any, reader: Any) -> None:
        labelled = [m for m in loop.manifests if m.get("labels")]
        if not labelled:
            if loop.rank == 0:
                loop.note("no labelled image set in the mix: probe_acc and knn_acc are not measured")
            return
        self.sets = {split: self.read(loop, labelled[0], split) for split in ("train", "val")}

    @staticmethod
    def read(loop: Any, manifest: dict, split: str) -> list[dict]:
        """Every image of `split` once (the last global batch wraps round: duplicates go by sample id later),
        in the evaluation view, with labels."""
        c, e = loop.cfg, loop.engine
        rows = GlobalOrder(manifest, split, c.run.seed, shuffle=False).rows
        stream = RankStream([manifest], MixPlan([(0, np.ones(1))], c.train.global_batch, np.zeros(1)), split,
                            c.run.seed, False, e.split, e.dp_rank, c.data.prefetch_batches, c.data.image,
                            c.data.audio, loop.feed)
        batches = stream.batches(0, -(-rows // c.train.global_batch))
        return [{"sample_id": b["sample_id"], "label": b["label"], "pixel_values": b["pixel_values"][:, 0]}
                for b in batches]

    def encode(self, loop: Any, batches: list[dict]) -> Labelled:
        """Every rank's features of `batches`, deduplicated by sample id, in id order (the same on every rank)."""
        def feature(model: Any, batch: dict) -> tuple[torch.Tensor, dict]:
            return model(pixel_values=batch["pixel_values"].to(model.dtype), features_only=True), {}

        mine = [(b["sample_id"].numpy(), b["label"].numpy(),
                 loop.engine.eval_step({"pixel_values": b["pixel_values"]}, feature)[0].float().cpu().numpy())
                for b in batches]
        ids, labels, feats = (np.concatenate(parts) for parts in zip(*mine))
        every: list = [None] * loop.engine.dp_size
        dist.all_gather_object(every, (ids, labels, feats), group=loop.engine.dp_group)
        ids, labels, feats = (np.concatenate(parts) for parts in zip(*every))
        _, first = np.unique(ids, return_index=True)
        return feats[first], labels[first]

    def evaluate(self, loop: Any, step: int, record: dict) -> None:
        if self.sets is None:
            return
        train, val = (self.encode(loop, self.sets[split]) for split in ("train", "val"))
        if loop.rank != 0:
            return
        from threadpoolctl import threadpool_limits

        with threadpool_limits(loop.threads):  # the rank's own cores, as training
            record["probe_acc"] = linear_probe(train, val, loop.cfg.run.seed)
            record["knn_acc"] = knn_accuracy(train, val, self.k)
