"""The host-allocator setting keeps a training thread's freed activations mapped instead of refaulting them."""
import subprocess
import sys

import pytest

# Like a step on Ray Train's (non-main) training thread: a dozen 2 MiB activations live at once, then freed.
PROBE = """
import ctypes, resource, threading, torch
from raypt.engines.device import keep_host_memory

def faults_per_step():
    out = []
    def step():
        keep = [torch.ones(1 << 19) for _ in range(12)]
        del keep
    def work():
        step()
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        for _ in range(20):
            step()
        out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 20)
    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out[0]

# glibc's initial mmap threshold, pinned: a large block an import happened to free would have raised glibc's
# dynamic threshold, and with it this baseline, by the accident of what was imported before
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
default = faults_per_step()
keep_host_memory()
print(default, faults_per_step())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_stay_mapped():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, kept = map(float, out.split())
    assert default > 1000  # glibc's defaults hand the memory back and fault it in again every step
    assert kept < default / 10
