"""Metrics, declared once: whoever reports a metric (the loop, a task, a hook, an engine) declares its name and how
it reduces across ranks; the sinks (metrics.jsonl and its trackers, the console, Ray and Tune) take every declared
metric from one record. Light on purpose: config and task modules import it without torch or Ray."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Reduce = Literal["mean", "sum", "max", "rank0"]


@dataclass(frozen=True)
class Metric:
    """One scalar a run reports. `reduce`: how the per-rank values become the run's value (`rank0`: rank 0's
    own, for values every rank agrees on or only rank 0 knows, such as the LR or the step time)."""
    name: str
    reduce: Reduce = "mean"
    doc: str = ""


# What the loop itself reports every step (val_loss at evaluations, checkpoint_s at checkpoints).
CORE = (
    Metric("loss", "mean", "training loss of the step, averaged over its micro-batches and ranks"),
    Metric("val_loss", "mean", "validation loss of the mix: each source's val_loss/<source> weighted by the mix "
           "weights in force at the step"),
    Metric("data_wait_s", "mean", "seconds a rank waited for its batches during the step"),
    Metric("lr", "rank0", "learning rate of the step"),
    Metric("tokens_seen", "rank0", "global tokens trained on after the step"),
    Metric("samples_seen", "rank0", "global samples trained on after the step"),
    Metric("tokens_per_s", "rank0", "global tokens per second of the step"),
    Metric("mfu", "rank0", "model FLOPs utilisation against the peak of every rank"),
    Metric("hfu", "rank0", "hardware FLOPs utilisation: mfu with the recomputation of activation checkpointing"),
    Metric("step_time_s", "rank0", "wall time of the step on rank 0"),
    Metric("world_size", "rank0", "ranks in the worker group"),
    Metric("checkpoint_s", "rank0", "seconds training was held up by a checkpoint"),
)


def source_losses(names: list[str]) -> tuple[Metric, ...]:
    """`val_loss/<name>` of each source a job evaluates (its mix, then its evaluation-only datasets): the job's
    own names, so declared per job."""
    return tuple(Metric(f"val_loss/{n}", "mean", f"validation loss of source {n} over train.eval_batches batches")
                 for n in names)


class Reducer:
    """Per-rank values -> the run's values, each by its declared reduction, in one all-reduce for means and sums
    (plus one for maxima, only when a step has any). A name nobody declared is an error: declare it once."""

    def __init__(self, declared: "list[Metric] | tuple[Metric, ...]"):
        self.declared = {m.name: m for m in declared}

    def __call__(self, values: dict, device=None) -> dict[str, float]:
        import torch
        import torch.distributed as dist

        unknown = sorted(set(values) - set(self.declared))
        if unknown:
            raise KeyError(f"metrics {unknown} were reported but never declared")
        out = {k: float(v) for k, v in values.items() if self.declared[k].reduce == "rank0"}
        world = dist.get_world_size()
        for kinds, op in ((("mean", "sum"), dist.ReduceOp.SUM), (("max",), dist.ReduceOp.MAX)):
            names = [k for k in values if self.declared[k].reduce in kinds]
            if not names:
                continue
            t = torch.tensor([float(values[k]) for k in names], device=device, dtype=torch.float64)
            dist.all_reduce(t, op=op)
            if kinds[0] == "mean":
                means = (t / world).tolist()
                t = t.tolist()
                out.update({k: means[i] if self.declared[k].reduce == "mean" else t[i] for i, k in enumerate(names)})
            else:
                out.update(zip(names, t.tolist()))
        return out
