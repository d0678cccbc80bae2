"""Node loss and node return on a real 2-node local Ray cluster: the elastic run shrinks, goes on, and grows."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest


def run_drill(*args: str) -> list[tuple[int, int]]:
    """(step, world size) pairs the drill saw, in order."""
    drill = os.path.join(os.path.dirname(__file__), "elastic_drill.py")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    proc = subprocess.Popen([sys.executable, drill, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    line = next((ln for ln in out.splitlines() if ln.startswith("WORLD_SIZES ")), None)
    timeouts = [ln for ln in out.splitlines() if "elastic drill: timed out" in ln]
    assert line, "\n".join(timeouts) or out[-3000:]
    return json.loads(line.split(" ", 1)[1])


def phases_of(sizes: list) -> list[int]:
    return [ws for i, (_, ws) in enumerate(sizes) if i == 0 or sizes[i - 1][1] != ws]


def test_node_loss_shrinks_and_node_return_grows_the_run(tiny_data, tmp_path):
    sizes = run_drill(tiny_data, str(tmp_path / "runs"))
    phases = phases_of(sizes)
    assert phases[:3] == [2, 1, 2], phases
    steps = [s for s, _ in sizes]
    assert steps == sorted(set(steps)), "a step was recorded twice or out of order"


@pytest.mark.autoscaler
def test_elastic_run_grows_as_the_autoscaler_adds_nodes(tiny_data, tmp_path):
    """Runs in its own pytest process (`make test` does this): the fake autoscaling cluster stops all Ray first."""
    sizes = run_drill("autoscale", tiny_data, str(tmp_path / "runs"))
    assert phases_of(sizes)[:2] == [1, 2]
