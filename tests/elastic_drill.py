"""Elastic drill on a real 2-node local Ray cluster (run by test_elastic.py in its own process).

Starts an elastic run (workers 1..2) across two nodes, removes the second node, waits until the run goes on with
one worker, adds a node back, waits until the run grows to two workers again, then prints the world sizes seen.
With `autoscale` first, it instead runs on Ray's fake autoscaling cluster: the run starts at min workers on the
head node and grows to max once the autoscaler adds a node for the pending worker.
Usage: python elastic_drill.py [autoscale] DATA_PATH STORAGE
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


def start_endless_run(data: str, storage: str, resize_interval_s: int = 5) -> str:
    """An elastic run (1..2 workers) that never ends by itself; returns its metrics file."""
    from raypt import config
    from raypt.driver import train

    cfg = config.load(None, [
        f"data.path={data}", f"run.storage={storage}", "run.name=elastic", "model.hidden_size=64",
        "model.num_layers=2", "model.num_heads=2", "train.steps=100000", "train.global_batch=8",
        "train.micro_batch=2", "train.eval_every=100000", "checkpoint.every=20", "failure.max_failures=5",
        "scaling.workers={min: 1, max: 2}", f"scaling.resize_interval_s={resize_interval_s}",
        "scaling.cpus_per_worker=1.5"])
    threading.Thread(target=lambda: train(cfg), daemon=True).start()
    return os.path.join(storage, "elastic", "metrics.jsonl")


FAKE_PROVIDER_CONFIG = {  # Ray's fake_multinode example config, which the Ray wheel does not ship
    "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {}, "file_mounts": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


def autoscale(data: str, storage: str) -> None:
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class FakeAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, **_):
            head = {"resources": head_resources, "node_config": {}, "max_workers": 0}
            return {**FAKE_PROVIDER_CONFIG, "available_node_types": {**worker_node_types, "ray.head.default": head}}

    cluster = FakeAutoscalingCluster(head_resources={"CPU": 2}, worker_node_types={
        "cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}})
    cluster.start()  # note: `ray stop --force` first, so this drill runs apart from other Ray clusters
    try:
        ray.init("auto")
        # The autoscaler adds the node within seconds; a slower resize check lets the 1-worker group start up and
        # pass a checkpoint first (start-up alone took over 40 s on a busy 2-core machine).
        metrics = start_endless_run(data, storage, resize_interval_s=90)
        wait_for(lambda: any(ws == 1 for _, ws in world_sizes(metrics)), "the run to start at min workers")
        wait_for(lambda: any(ws == 2 for _, ws in world_sizes(metrics)), "the autoscaler to add a node")
        print("WORLD_SIZES " + json.dumps(world_sizes(metrics)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    os._exit(0)


def main(data: str, storage: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    second = cluster.add_node(**NODE)
    ray.init(address=cluster.address)
    metrics = start_endless_run(data, storage)
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
    autoscale(*sys.argv[2:]) if sys.argv[1] == "autoscale" else main(*sys.argv[1:])
