"""Elastic drill on a real 2-node local Ray cluster (run by test_elastic.py in its own process).

Starts an elastic run (workers 1..2) across two nodes, removes the second node, waits until the run goes on with
one worker, adds a node back, waits until the run grows to two workers again, then prints the world sizes seen.
Usage: python elastic_drill.py DATA_PATH STORAGE
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
NODE = {"num_cpus": 2}  # one worker (1.5 CPUs) + Ray Data read tasks


def world_sizes(path: str) -> list[tuple[int, int]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["step"], r["world_size"]) for r in map(json.loads, f) if "world_size" in r]


def wait_for(condition, what: str, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"elastic drill: timed out waiting for {what}")
        time.sleep(0.5)


def main(data: str, storage: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from raypt import config
    from raypt.launch import train

    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    second = cluster.add_node(**NODE)
    ray.init(address=cluster.address)
    cfg = config.load(None, [
        f"data.path={data}", f"run.storage={storage}", "run.name=elastic", "model.hidden_size=64",
        "model.num_layers=2", "model.num_heads=2", "train.steps=100000", "train.global_batch=8",
        "train.micro_batch=2", "train.eval_every=100000", "checkpoint.every=20", "failure.max_failures=5",
        "scaling.workers={min: 1, max: 2}", "scaling.resize_interval_s=5", "scaling.cpus_per_worker=1.5"])
    metrics = os.path.join(storage, "elastic", "metrics.jsonl")
    threading.Thread(target=lambda: train(cfg), daemon=True).start()
    wait_for(lambda: any(ws == 2 and s >= 25 for s, ws in world_sizes(metrics)), "2 workers past a checkpoint")
    cluster.remove_node(second)
    removed_at = max(s for s, _ in world_sizes(metrics))
    wait_for(lambda: sum(ws == 1 and s > removed_at for s, ws in world_sizes(metrics)) >= 25,
             "the run to go on with 1 worker")
    cluster.add_node(**NODE)
    shrunk_at = max(s for s, _ in world_sizes(metrics))
    wait_for(lambda: any(ws == 2 and s > shrunk_at for s, ws in world_sizes(metrics)), "the run to grow back to 2")
    print("WORLD_SIZES " + json.dumps(world_sizes(metrics)), flush=True)
    ray.shutdown()
    cluster.shutdown()
    marker = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")  # else later ray.init() joins it
    if os.path.exists(marker) and open(marker).read().strip() == cluster.address:
        os.remove(marker)
    os._exit(0)  # the run is endless by design; its thread must not hold this process


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
