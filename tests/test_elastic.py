"""Node loss and node return on a real 2-node local Ray cluster: the elastic run shrinks, goes on, and grows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys


def test_node_loss_shrinks_and_node_return_grows_the_run(tiny_data, tmp_path):
    drill = os.path.join(os.path.dirname(__file__), "elastic_drill.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, drill, tiny_data, str(tmp_path / "runs")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    line = next((ln for ln in out.splitlines() if ln.startswith("WORLD_SIZES ")), None)
    assert line, out[-3000:]
    sizes = json.loads(line.split(" ", 1)[1])
    phases = [ws for i, (_, ws) in enumerate(sizes) if i == 0 or sizes[i - 1][1] != ws]
    assert phases[:3] == [2, 1, 2], phases
    steps = [s for s, _ in sizes]
    assert steps == sorted(set(steps)), "a step was recorded twice or out of order"
