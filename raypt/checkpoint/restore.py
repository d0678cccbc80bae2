"""Choosing the checkpoint a run restores from: the newest one that every rank verifies.

Each rank checks only the files it reads (`Reader.verify`); then the ranks exchange their outcomes, so all of them
restore the same checkpoint or all fall back to the previous one together. A rank cannot decide alone: the engine
build that follows is collective, and one rank falling back would leave the others waiting in it.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional, Union

import torch.distributed as dist

from raypt.checkpoint.index import CheckpointError, Reader, read_state
from raypt.checkpoint.init import Initial, initial
from raypt.checkpoint.store import list_checkpoints, local_copy


def _every_rank(value: Any) -> list:
    """`value` of every rank, in rank order (this process's alone outside a process group)."""
    if not dist.is_initialized():
        return [value]
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def _check(uri: str, stack: ExitStack) -> tuple[Optional[Reader], Optional[str]]:
    """(reader, None) when the files this rank reads of `uri` verify, else (None, why)."""
    try:
        read_state(uri)  # sizes first: a torn checkpoint is not downloaded
        reader = Reader(stack.enter_context(local_copy(uri)), origin=uri)
        reader.verify()
        return reader, None
    except CheckpointError as e:
        return None, str(e)


@contextmanager
def newest_verified(run_uri: str, resume_from: Optional[str], log: Callable[[str], None] = print,
                    init_from: Optional[Any] = None) -> Iterator[Optional[Union[Reader, Initial]]]:
    """Collective. A Reader, valid inside the block, of the newest checkpoint of the run that every rank verifies,
    else of `resume_from`, else `init_from`'s weights as a new run (an Initial), else None (a fresh start). Each
    checkpoint skipped is logged with the reasons, which name the file; a `resume_from` or `init_from` that does
    not verify is an error, not a silent fresh start."""
    # rank 0's listing: every rank must walk the same candidates, one collective each
    own = _every_rank(list(reversed(list_checkpoints(run_uri))))[0]
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
    with local_copy(init_from.path) as directory:
        source, error = None, None
        try:
            source = initial(directory, init_from.path, init_from.optimizer)
        except CheckpointError as e:
            error = str(e)
        errors = list(dict.fromkeys(e for e in _every_rank(error) if e))
        if errors:
            raise CheckpointError(f"run.init_from={init_from.path}: {'; '.join(errors)}")
        yield source
