"""Loop hooks: small objects the worker loop calls at a few events, so work around the step plugs in without
editing the loop. A hook may also keep state in the checkpoint (named full tensors and a JSON-able dict) and get
it back on restore at any world size.

Events, in the order a step fires them:
  start(loop, reader)          once, after the engine is built; `reader` is the checkpoint resumed from or None
  before_step(loop, step)      before the step's batches are drawn
  measure(loop, step) -> dict  per-rank values of declared metrics, reduced across ranks with the step's loss
  after_step(loop, step, rec)  the optimizer step is done and `rec` holds the run's values; may request a
                               checkpoint (`loop.request_checkpoint`)
  evaluate(loop, step, rec)    after an evaluation added `val_loss` (and other evaluation metrics) to `rec`
  save(loop, step, rec)        this rank's part is written locally and not yet uploaded: make durable here
                               whatever the checkpoint covers (the metrics sink flushes)
  step_end(loop, step, rec)    `rec` is final (evaluated, checkpointed)
  end(loop)                    the last step is done and every upload has landed
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional

from raypt.metrics import Metric

if TYPE_CHECKING:
    import torch

    from raypt.checkpoint import Reader

STEP_EVENTS = ("before_step", "measure", "after_step", "evaluate", "save", "step_end")


class Hook:
    """Override the events you need. `name` keys the hook's state in the checkpoint."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[Metric, ...]] = ()

    def start(self, loop: Any, reader: Optional["Reader"]) -> None: ...
    def before_step(self, loop: Any, step: int) -> None: ...
    def measure(self, loop: Any, step: int) -> dict[str, float]:
        return {}
    def after_step(self, loop: Any, step: int, record: dict) -> None: ...
    def evaluate(self, loop: Any, step: int, record: dict) -> None: ...
    def save(self, loop: Any, step: int, record: dict) -> None: ...
    def step_end(self, loop: Any, step: int, record: dict) -> None: ...
    def end(self, loop: Any) -> None: ...

    def state(self) -> Optional[tuple[dict[str, "torch.Tensor"], dict]]:
        """What to keep in the checkpoint: (full tensors by name, JSON-able dict), or None for nothing."""
        return None

    def restore(self, tensors: dict[str, "torch.Tensor"], state: dict) -> None:
        """Called by `start` helpers with what `state` saved, whatever the world size that saved it."""


class EveryHook(Hook):
    """A plain function run after every N-th optimizer step: `hooks.add(fn, every=N)`, fn(loop, step, record)."""

    def __init__(self, fn: Callable[[Any, int, dict], None]):
        self.fn = fn

    def after_step(self, loop: Any, step: int, record: dict) -> None:
        self.fn(loop, step, record)


class Hooks:
    """The loop's hooks, each with its step cadence."""

    def __init__(self) -> None:
        self.entries: list[tuple[Hook, int]] = []

    def add(self, hook: "Hook | Callable[[Any, int, dict], None]", every: int = 1) -> None:
        self.entries.append((hook if isinstance(hook, Hook) else EveryHook(hook), every))

    @property
    def metrics(self) -> list[Metric]:
        return [m for hook, _ in self.entries for m in hook.metrics]

    def fire(self, event: str, loop: Any, *args: Any) -> dict:
        """Call `event` on every hook due; `measure` results are merged and returned."""
        out: dict = {}
        for hook, every in self.entries:
            if event in STEP_EVENTS and args[0] % every:
                continue
            got = getattr(hook, event)(loop, *args)
            if event == "measure":
                out.update(got)
        return out

    def start(self, loop: Any, reader: Optional["Reader"]) -> None:
        """Hand each stateful hook what it saved (at any world size), then fire `start`."""
        for hook, _ in self.entries:
            if reader is not None and hook.name and hook.name in reader.hooks:
                hook.restore(reader.hook_tensors(hook.name), reader.hooks[hook.name])
            hook.start(loop, reader)

    def states(self) -> dict[str, tuple[dict, dict]]:
        out = {}
        for hook, _ in self.entries:
            got = hook.state()
            if got is not None:
                out[hook.name] = got
        return out
