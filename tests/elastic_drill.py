"""Elastic drill on a real 2-node local Ray cluster (run by test_elastic.py in its own process).

Starts an elastic run (workers 1..3, fractional CPUs: two fit the head node, one the second node) on a global
batch of 16, which 3 workers split unequally, with in-memory snapshots every step. It removes the second node (the
run goes on with 2 workers, from the snapshot's replica on the head node), adds a
node back (the run grows to 3), drains that node as a cloud would before reclaiming it (the run checkpoints at
once), then removes it; it prints the world sizes seen and the step the drain checkpoint was taken at.
`reference` runs the same job on one worker for a given number of steps, the losses the elastic run must match.
With `autoscale` first, it instead runs on Ray's fake autoscaling cluster: the run starts at min workers on the
head node and grows to max once the autoscaler adds a node for the pending worker.
Usage: python elastic_drill.py [autoscale|reference STEPS] DATA_PATH STORAGE
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Right after a node is lost, the resources Ray Train's elastic policy reads (Ray Data's autoscaling coordinator)
# still count it: the policy asks for 3 workers and waits out the group start timeout (60 s by default) before it
# tries 2. Here a group starts in about 8 s, so 25 s bounds that wait with room to spare.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "25")
HEAD, NODE = {"num_cpus": 3}, {"num_cpus": 2}  # 2 and 1 workers of 1.2 CPUs, the rest for Ray Data read tasks
CHECKPOINT_EVERY, DRAIN_CHECK_EVERY = 10, 3


def world_sizes(path: str) -> list[tuple[int, int]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(r["step"], r["world_size"]) for r in map(json.loads, f) if "world_size" in r]


def wait_for(condition, what: str, timeout: float = 240.0, metrics: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            seen = ""
            if metrics and os.path.exists(metrics):
                with open(metrics) as f:
                    seen = [{k: r[k] for k in ("step", "world_size", "resumed_from", "checkpoint_s", "node_drain")
                             if k in r} for r in map(json.loads, f)][-30:]
            raise TimeoutError(f"elastic drill: timed out waiting for {what}; last records: {seen}")
        time.sleep(0.5)


def job(data: str, storage: str, name: str, steps: int, workers: str, resize_interval_s: int, memory_every: int = 0):
    from raypt import config

    return config.load(None, [
        f"data.path={data}", f"run.storage={storage}", f"run.name={name}", "model.hidden_size=64",
        "model.num_layers=2", "model.num_heads=2", f"train.steps={steps}", "train.global_batch=16",
        "train.micro_batch=2", "train.lr=1e-3", "train.schedule={name: constant, warmup: 0}",
        "train.eval_every=100000", f"checkpoint.every={CHECKPOINT_EVERY}", "failure.max_failures=5",
        f"failure.preemption_check_every={DRAIN_CHECK_EVERY}", f"scaling.workers={workers}",
        f"scaling.resize_interval_s={resize_interval_s}", "scaling.cpus_per_worker=1.2",
        f"checkpoint.memory_every={memory_every}"])


def start_endless_run(data: str, storage: str, resize_interval_s: int = 5, workers: str = "{min: 1, max: 3}",
                      memory_every: int = 1) -> str:
    """An elastic run that never ends by itself (a constant LR: its steps match a finite run's), by default with
    in-memory snapshots every step (each rank's share on its node and on the other); returns its metrics file."""
    from raypt.driver import train

    cfg = job(data, storage, "elastic", 100000, workers, resize_interval_s, memory_every=memory_every)
    threading.Thread(target=lambda: train(cfg), daemon=True).start()
    return os.path.join(storage, "elastic", "metrics.jsonl")


def reference(steps: str, data: str, storage: str) -> None:
    """The same job on one worker, uninterrupted, on the embedded cluster."""
    from raypt.driver import train

    train(job(data, storage, "reference", int(steps), "1", 60))


FAKE_PROVIDER_CONFIG = {  # Ray's fake_multinode example config, which the Ray wheel does not ship
    "cluster_name": "fake_multinode", "max_workers": 8, "head_node_type": "ray.head.default",
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.1, "docker": {}, "file_mounts": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
    "head_start_ray_commands": [], "worker_start_ray_commands": [], "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": []}


def autoscale(data: str, storage: str) -> None:
    import subprocess

    import ray
    from ray.cluster_utils import AutoscalingCluster

    class FakeAutoscalingCluster(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, **_):
            head = {"resources": head_resources, "node_config": {}, "max_workers": 0}
            return {**FAKE_PROVIDER_CONFIG, "available_node_types": {**worker_node_types, "ray.head.default": head}}

    cluster = FakeAutoscalingCluster(head_resources={"CPU": 2}, worker_node_types={
        "cpu_node": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 1}})
    # A head started with `ray start` in token mode needs a token on disk; the embedded cluster of an earlier
    # test may have written it, but this drill also runs alone on a fresh machine.
    subprocess.run(["ray", "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL)
    cluster.start()  # note: `ray stop --force` first, so this drill runs apart from other Ray clusters
    try:
        ray.init("auto")
        # The autoscaler adds the node within seconds; a slower resize check lets the 1-worker group start up and
        # record steps first (start-up takes about 25 s here, this drill running alone; over 60 s on a busy
        # 2-core machine, where a 60 s check resized the group before it had recorded a step). No snapshots:
        # this drill is about growing, and holders on a node that comes and goes are the node-loss drill's part.
        metrics = start_endless_run(data, storage, resize_interval_s=90, workers="{min: 1, max: 2}",
                                    memory_every=0)
        wait_for(lambda: any(ws == 1 for _, ws in world_sizes(metrics)), "the run to start at min workers")
        wait_for(lambda: any(ws == 2 for _, ws in world_sizes(metrics)), "the autoscaler to add a node")
        print("WORLD_SIZES " + json.dumps(world_sizes(metrics)), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    os._exit(0)


def drain_checkpoints(path: str) -> list[int]:
    with open(path) as f:
        return [r["step"] for r in map(json.loads, f) if r.get("node_drain")]


def main(data: str, storage: str) -> None:
    import subprocess

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=HEAD)
    second = cluster.add_node(**NODE)
    ray.init(address=cluster.address)
    metrics = start_endless_run(data, storage)
    last = lambda: max(s for s, _ in world_sizes(metrics))  # noqa: E731
    wait_for(lambda: any(ws == 3 and s > CHECKPOINT_EVERY for s, ws in world_sizes(metrics)),
             "3 workers past a checkpoint", metrics=metrics)
    cluster.remove_node(second)
    removed_at = last()
    wait_for(lambda: sum(ws == 2 and s > removed_at for s, ws in world_sizes(metrics)) >= 5,
             "the run to go on with 2 workers", metrics=metrics)
    third = cluster.add_node(**NODE)
    shrunk_at = last()
    wait_for(lambda: any(ws == 3 and s > shrunk_at for s, ws in world_sizes(metrics)), "the run to grow back to 3",
             metrics=metrics)
    drained_at = last()
    subprocess.run(["ray", "drain-node", f"--address={cluster.address}", f"--node-id={third.node_id}",
                    "--reason=DRAIN_NODE_REASON_PREEMPTION", "--reason-message=elastic drill",
                    "--deadline-remaining-seconds=120"], check=True, capture_output=True)
    wait_for(lambda: drain_checkpoints(metrics), "the drain's checkpoint", metrics=metrics)
    drain_checkpoint = drain_checkpoints(metrics)[0]
    cluster.remove_node(third)
    wait_for(lambda: sum(ws == 2 and s > drain_checkpoint for s, ws in world_sizes(metrics)) >= 3,
             "the run to go on with 2 workers after the drain", metrics=metrics)
    print("WORLD_SIZES " + json.dumps(world_sizes(metrics)), flush=True)
    print("DRAIN " + json.dumps({"noticed_after": drained_at, "checkpoint": drain_checkpoint}), flush=True)
    ray.shutdown()
    cluster.shutdown()
    marker = os.path.join(tempfile.gettempdir(), "ray", "ray_current_cluster")  # else later ray.init() joins it
    if os.path.exists(marker) and open(marker).read().strip() == cluster.address:
        os.remove(marker)
    os._exit(0)  # the run is endless by design; its thread must not hold this process


if __name__ == "__main__":
    what = sys.argv[1]
    autoscale(*sys.argv[2:]) if what == "autoscale" else reference(*sys.argv[2:]) if what == "reference" \
        else main(*sys.argv[1:])
