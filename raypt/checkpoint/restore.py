"""Choosing the checkpoint a run restores from: the newest one that every rank verifies.

Each rank checks its share of the files (`Reader.verify`), the ranks together every file, each byte once; then
they exchange their outcomes, so all of them
restore the same checkpoint or all fall back to the previous one together. A rank cannot decide alone: the engine
build that follows is collective, and one rank falling back would leave the others waiting in it.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch.distributed as dist

from raypt.checkpoint.index import CheckpointError, Reader, read_state
from raypt.checkpoint.init import Initial, initial
from raypt.checkpoint.store import list_checkpoints


def _every_rank(value: Any) -> list:
    """`value` of every rank, in rank order (this process's alone outside a process group)."""
    if not dist.is_initialized():
        return [value]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def _place() -> tuple[int, int]:
    """(rank, world) of this process's group; (0, 1) outside one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _check(uri: str, stack: ExitStack) -> tuple[Optional[Reader], Optional[str]]:
    """(reader, None) when this rank's share of `uri`'s files verifies, else (None, why). The reader reads in
    place, local or on S3: nothing is downloaded beyond what this rank checks and restores."""
    try:
        read_state(uri)  # sizes first: a torn checkpoint is not read
        reader = Reader(uri)
        stack.callback(reader.close)
        reader.verify(*_place())
        return reader, None
    except CheckpointError as e:
        return None, str(e)


def _step(uri: str) -> int:
    return int(uri.rsplit("step", 1)[-1])


@contextmanager
def _from_memory(snapshots: Any, newest_durable: int, log: Callable[[str], None]) -> Iterator[Optional[Reader]]:
    """Collective. A Reader of the newest in-memory snapshot (raypt/checkpoint/memory.py) at or after the newest
    durable checkpoint, every rank's share of it fetched and verified; else None, the reasons logged."""
    import ray
    from ray.exceptions import RayError

    from raypt.checkpoint.memory import memory_reader, registry_gone

    try:
        snapshot, passed = ray.get(snapshots.newest.remote()) if _place()[0] == 0 else (None, [])
    except RayError as e:
        snapshot, passed = None, [registry_gone(e)]
    step = _every_rank(snapshot["step"] if snapshot else None)[0]  # rank 0's choice, so that all try the same
    if step is not None and step < newest_durable:
        passed.append(f"the durable checkpoint of step {newest_durable} is newer than the in-memory snapshot of "
                      f"step {step}")
        step = None
    with ExitStack() as stack:
        error = None
        if step is not None:
            try:
                found, _ = ray.get(snapshots.newest.remote(at=step))
                if found is None:
                    raise CheckpointError(f"the in-memory snapshot of step {step} went before it was read")
                reader = memory_reader(found)
                stack.callback(reader.close)
                reader.verify(*_place())
            except CheckpointError as e:
                error = str(e)
            except RayError as e:
                error = registry_gone(e)
            errors = list(dict.fromkeys(e for e in _every_rank(error) if e))
            if not errors:
                log(f"resuming from the in-memory snapshot of step {step}" + (f" (newest durable checkpoint: "
                    f"step {newest_durable})" if newest_durable else ""))
                yield reader
                return
            passed += errors
        if passed:
            log(f"{'; '.join(passed)}: resuming from the durable checkpoints")
        yield None


@contextmanager
def newest_verified(run_uri: str, resume_from: Optional[str], log: Callable[[str], None] = print,
                    init_from: Optional[Any] = None, snapshots: Optional[Any] = None
                    ) -> Iterator[Optional[Union[Reader, Initial]]]:
    """Collective. A Reader, valid inside the block, of the newest in-memory snapshot (with `snapshots`, the
    run's registry) or checkpoint of the run that every rank verifies, else of `resume_from`, else `init_from`'s
    weights as a new run (an Initial), else None (a fresh start). Each snapshot or checkpoint skipped is logged
    with the reasons, which name the file; a `resume_from` or `init_from` that does not verify is an error, not a
    silent fresh start."""
    # rank 0's listing: every rank must walk the same candidates, one collective each
    own = _every_rank(list(reversed(list_checkpoints(run_uri))))[0]
    if snapshots is not None:
        with _from_memory(snapshots, _step(own[0]) if own else 0, log) as reader:
            if reader is not None:
                yield reader
                return
    for uri in own + ([resume_from] if resume_from else []):
        with ExitStack() as stack:
            reader, error = _check(uri, stack)
            errors = list(dict.fromkeys(e for e in _every_rank(error) if e))  # most often one file, seen by all
            if not errors:
                yield reader
                return
        why = "; ".join(errors)
        if uri == resume_from and uri not in own:
            raise CheckpointError(f"run.resume_from={uri} does not verify: {why}")
        log(f"{why}; falling back to the previous checkpoint")  # each reason names the checkpoint and its file
    if init_from is None:
        yield None
        return
    source, error = None, None
    try:
        source = initial(init_from.path, init_from.path, init_from.optimizer, *_place())
    except CheckpointError as e:
        error = str(e)
    errors = list(dict.fromkeys(e for e in _every_rank(error) if e))
    if errors:
        raise CheckpointError(f"run.init_from={init_from.path}: {'; '.join(errors)}")
    yield source
