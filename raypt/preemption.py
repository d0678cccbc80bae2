"""Graceful preemption. SIGTERM (a spot reclaim, a pod eviction) only marks the worker; at the next step
boundary every rank learns of it through the step's all-reduce, they commit a checkpoint together, and the
marked worker exits. A watchdog exits anyway when the grace period runs out (a hung collective, a slow save).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Optional

_signalled_at: Optional[float] = None
_grace_s = 25.0


def install() -> None:
    """Must run on the process's main thread: Ray Train unpickles the train function there, importing raypt.loop."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def set_grace(seconds: float) -> None:
    global _grace_s
    _grace_s = seconds


def _on_sigterm(signum, frame) -> None:
    global _signalled_at
    if _signalled_at is None:
        _signalled_at = time.time()
        threading.Timer(_grace_s, exit_now).start()


def signalled() -> bool:
    return _signalled_at is not None


def exit_now() -> None:
    """Leave as a failed worker (exit code 143, as SIGTERM would), so Ray Train restarts the group."""
    os._exit(143)
