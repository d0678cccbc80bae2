"""A process's host memory: resident set now and at its peak, the peak reset at will (Linux; elsewhere None)."""
from __future__ import annotations

from typing import Optional

MB = 1 << 20


def _status(field: str) -> Optional[int]:
    """A size line of /proc/self/status (VmRSS, VmHWM) in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss() -> Optional[int]:
    """The resident set now, in bytes."""
    return _status("VmRSS")


class HostPeak:
    """`with HostPeak() as p: ...` -> `p.above`: the peak resident set during the block above the resident set
    at its start (or above `baseline`), in bytes. The kernel's high-water mark is reset on entry (clear_refs 5)."""

    def __init__(self, baseline: Optional[int] = None) -> None:
        self.baseline = baseline
        self.start: Optional[int] = None
        self.above: Optional[int] = None

    def __enter__(self) -> "HostPeak":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            return self
        self.start = rss()
        return self

    def __exit__(self, *exc) -> None:
        peak = _status("VmHWM")
        if self.start is not None and peak is not None:
            self.above = peak - (self.start if self.baseline is None else self.baseline)
