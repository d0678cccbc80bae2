"""Initialization by name: every module's weights are a pure function of (seed, its path in the model).

A model built in full, one built partitioned under ZeRO-3 (each rank holding a slice of each parameter) and a
pipeline stage holding a few layers then start from the same weights, because none of them draws from one RNG
stream whose position depends on what was built before. Each module is initialised as transformers initialises it
(the `_init_weights` of its nearest ancestor that defines one, children before parents, as `smart_apply` does),
else by its own `reset_parameters`, with torch's RNG seeded from sha256(f"{seed}/{path}"). Parameters no rule
touches keep the values their constructor gave them, drawn from the seed in construction order (the same in every
build of the same modules).
"""
from __future__ import annotations

import hashlib
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

Gather = Callable[[list[nn.Parameter]], AbstractContextManager]  # full tensors inside, re-partitioned after


@dataclass(frozen=True)
class Partition:
    """How an engine builds a model that no rank holds whole: the context its modules are constructed in (each
    parameter partitioned as its module is made) and how a few parameters are gathered in full and written."""
    building: Callable[[], AbstractContextManager]
    gather: Gather


def module_seed(seed: int, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{path}".encode()).digest()[:8], "little") >> 1


def _rules(model: nn.Module, prefix: str = "", owner: Optional[nn.Module] = None
           ) -> Iterator[tuple[str, nn.Module, Callable[[nn.Module], None]]]:
    """(path, module, how to initialise it), children first; modules no rule covers are left out. A part of a
    model (a pipeline layer) gives its `prefix` in the whole and the whole's `owner` of `_init_weights`."""
    def walk(path: str, module: nn.Module, owner: Optional[nn.Module]):
        own = module if callable(getattr(module, "_init_weights", None)) else owner
        for name, child in module.named_children():
            yield from walk(f"{path}.{name}" if path else name, child, own)
        if own is not None:
            yield path, module, own._init_weights
        elif callable(getattr(module, "reset_parameters", None)):
            yield path, module, lambda m: m.reset_parameters()

    yield from walk(prefix, model, owner)


class _Writes(TorchDispatchMode):
    """The storages an operation writes in place (on the meta device, where writing costs nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor):
                self.storages.add(value.untyped_storage()._cdata)
        return func(*args, **(kwargs or {}))


def touched(twin: nn.Module) -> dict[str, list[str]]:
    """For each module path of a meta-device twin, the names of the parameters its rule writes (one module's init
    may write its children's, as ViT-MAE's embeddings do)."""
    names = {p.untyped_storage()._cdata: n for n, p in twin.named_parameters()}
    out = {}
    with _guard():
        for path, module, rule in _rules(twin):
            with _Writes() as writes:
                rule(module)
            out[path] = [names[s] for s in writes.storages if s in names]
    return out


@contextmanager
def constructing() -> Iterator[None]:
    """Construct without transformers' own initialisation (init_by_name redoes it by name): partitioned, its
    rules would write empty slices, and skipped in every build, constructors draw the same numbers in each.
    Weight tying still runs."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = lambda self: None
    try:
        yield
    finally:
        PreTrainedModel.initialize_weights = original


def _guard() -> AbstractContextManager:
    """transformers' guard: its init functions leave tensors it marked as initialised (tied weights) alone."""
    from transformers import initialization

    return initialization.guard_torch_init_functions()


@torch.no_grad()
def init_by_name(model: nn.Module, seed: int, twin: Optional[nn.Module] = None,
                 gather: Optional[Gather] = None, prefix: str = "", owner: Optional[nn.Module] = None) -> None:
    """Initialise `model` in place. Partitioned (ZeRO-3), give `gather` and a meta-device `twin` of the same
    model: each module's rule then runs on the full tensors of just the parameters it writes, so no rank ever
    holds more than one module's parameters in full. A part of a model: its `prefix` and `owner` (`_rules`)."""
    params = dict(model.named_parameters())
    writes = touched(twin) if gather is not None else {}
    with _guard():
        for path, module, rule in _rules(model, prefix, owner):
            context = nullcontext()
            if gather is not None:
                if not writes.get(path):
                    continue  # writes only buffers, which every rank holds in full: done in construction
                context = gather(list({id(params[n]): params[n] for n in writes[path]}.values()))
            with context, torch.random.fork_rng(devices=[]):
                torch.manual_seed(module_seed(seed, path))
                rule(module)
