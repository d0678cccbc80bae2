"""What a person sees: raypt's own lines and the progress bar. Start-up chatter of Ray and DeepSpeed goes to
the run's log file (and to the console too with `--verbose`)."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager
from typing import Iterator, TextIO


def quiet_known_noise() -> None:
    """Hide warnings every ZeRO step or model build repeats, so real ones stay visible (on the workers)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor|.*reduce_scatter_tensor")
    # The autograd all_gather the contrastive loss gathers negatives with (raypt/contrastive/loss.py), every step.
    warnings.filterwarnings("ignore", message=r"torch\.distributed\.nn\.functional\.all_gather is deprecated")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()


_console: TextIO = sys.stdout


def console() -> TextIO:
    """The person's terminal, even while the process's own stdout and stderr go to the log file."""
    return _console


@contextmanager
def chatter_to(log_path: str, verbose: bool) -> Iterator[None]:
    """Point this process's file descriptors 1 and 2 (where Ray's forwarded worker output, its token-auth notice
    and DeepSpeed's op builds land) at `log_path`; raypt writes to `console()`, a copy of the old stdout."""
    global _console
    if verbose:
        yield
        return
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        _console.close()
        _console = sys.stdout
