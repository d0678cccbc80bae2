"""Node loss, return and drain on a real 2-node local Ray cluster: the elastic run shrinks (restored from the
in-memory snapshot's replica on the surviving node), goes on, grows, and checkpoints before a drained node goes,
its losses those of one uninterrupted worker."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from raypt.driver import EMBEDDED_ENV


def run_drill(*args: str) -> list[str]:
    """The drill's own output lines."""
    drill = os.path.join(os.path.dirname(__file__), "elastic_drill.py")
    # Not this process's embedded-cluster settings (a module before may have started one): they turn off Ray
    # Train's preemption watcher, and the drill's cluster is drained.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in EMBEDDED_ENV}
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    proc = subprocess.Popen([sys.executable, drill, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    timeouts = [ln for ln in out.splitlines() if "elastic drill: timed out" in ln]
    # (the exit status says little: Ray's core worker may end the process as the cluster goes down)
    assert not timeouts, "\n".join(timeouts)
    return out.splitlines()


def printed(lines: list[str], what: str):
    line = next((ln for ln in lines if ln.startswith(what + " ")), None)
    assert line, "\n".join(lines[-40:])  # the drill's last words
    return json.loads(line.split(" ", 1)[1])


def phases_of(sizes: list) -> list[int]:
    return [ws for i, (_, ws) in enumerate(sizes) if i == 0 or sizes[i - 1][1] != ws]


def records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_node_loss_return_and_drain_keep_the_one_worker_losses(tiny_data, tmp_path):
    """3 -> 2 -> 3 -> 2 workers on a global batch of 16 (3 workers take 6, 5 and 5 samples): every step's loss
    is the uninterrupted 1-worker run's, and a drained node's checkpoint is where the run resumes."""
    lines = run_drill(tiny_data, str(tmp_path / "runs"))
    sizes, drain = printed(lines, "WORLD_SIZES"), printed(lines, "DRAIN")
    assert phases_of(sizes)[:4] == [3, 2, 3, 2], phases_of(sizes)
    steps = [s for s, _ in sizes]
    assert steps == sorted(set(steps)), "a step was recorded twice or out of order"
    elastic = {r["step"]: r for r in records(str(tmp_path / "runs" / "elastic" / "metrics.jsonl"))}
    # The lost node's ranks' shares came back from their replicas on the head node: a step or two lost, not up
    # to a checkpoint interval.
    first = next(r for s, r in sorted(elastic.items()) if "resumed_from" in r)
    assert first.get("resumed_from_memory"), first
    # The drain was answered by a checkpoint of its own (a few steps later: the notice travels through Ray Train's
    # status polls), and the run resumed from that checkpoint when the node went.
    assert drain["checkpoint"] > drain["noticed_after"] and elastic[drain["checkpoint"]]["node_drain"]
    resumed = [r["resumed_from"] for s, r in sorted(elastic.items()) if s > drain["checkpoint"] and "resumed_from" in r]
    assert resumed and resumed[0] >= drain["checkpoint"], resumed
    last = max(elastic)
    run_drill("reference", str(last), tiny_data, str(tmp_path / "runs"))
    uninterrupted = {r["step"]: r["loss"] for r in records(str(tmp_path / "runs" / "reference" / "metrics.jsonl"))
                     if "loss" in r}
    diffs = [abs(elastic[s]["loss"] - uninterrupted[s]) for s in range(1, last + 1)]
    assert max(diffs) <= 1e-4, max(diffs)


@pytest.mark.autoscaler
def test_elastic_run_grows_as_the_autoscaler_adds_nodes(tiny_data, tmp_path):
    """Runs in its own pytest process (`make test` does this): the fake autoscaling cluster stops all Ray first."""
    try:
        sizes = printed(run_drill("autoscale", tiny_data, str(tmp_path / "runs")), "WORLD_SIZES")
    finally:  # the drill's own `ray stop` can be cut short (its core worker may end it as the cluster goes down)
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    assert phases_of(sizes)[:2] == [1, 2]
