"""Loop hooks: the base class and event list (`base`), and the hooks every run has."""
from __future__ import annotations

from typing import Any, Optional

from raypt.hooks.base import Hook, Hooks
from raypt.hooks.faults import Faults
from raypt.hooks.loss_scale import LossScale
from raypt.hooks.nonfinite import NonFinite
from raypt.hooks.preemption import Preemption
from raypt.hooks.pruning import Pruning
from raypt.hooks.report import RayReport, ResumeNote, SampleAudit, SinkReport
from raypt.hooks.snapshot import MemorySnapshot
from raypt.hooks.watchdog import Watchdog


def standard_hooks(cfg: Any, sink: Optional[Any], run_uri: str, rank: int, extra: tuple = (),
                   snapshots: Optional[Any] = None) -> Hooks:
    """Fault drills, the step watchdog, the non-finite-loss policy, fp16's loss scale, pruning (its metrics in
    dense runs too), the metrics sink (rank 0, when there is one), in-memory snapshots (with the run's registry),
    reports to Ray, preemption; then `extra` (hooks a caller of the driver's build step adds, e.g. `(hook, every)`
    pairs or hooks)."""
    hooks = Hooks()
    hooks.add(Faults(cfg.faults, run_uri, rank))
    hooks.add(Watchdog(cfg.failure.step_timeout_s, rank))
    hooks.add(NonFinite(cfg.train.on_nonfinite, run_uri, rank))
    hooks.add(LossScale())
    hooks.add(Pruning(cfg.sparsity))  # before the reports: its metrics join the step's record
    if cfg.run.log_sample_ids:
        hooks.add(SampleAudit())
    if sink is not None and rank == 0:
        hooks.add(SinkReport(sink, cfg.run.log_every, cfg.checkpoint.memory_every if snapshots else 0))
    if snapshots is not None:  # after the report: a snapshot is recorded once its step's records are in the sink
        hooks.add(MemorySnapshot(snapshots, sink), every=cfg.checkpoint.memory_every)
    hooks.add(RayReport())
    hooks.add(ResumeNote())
    hooks.add(Preemption(cfg.failure.sigterm_grace_s, cfg.failure.preemption_check_every))
    for entry in extra:
        hooks.add(*entry) if isinstance(entry, tuple) else hooks.add(entry)
    return hooks


__all__ = ["Hook", "Hooks", "standard_hooks"]
