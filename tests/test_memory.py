"""The gloo tier: a ZeRO-3 model is built partitioned, so no rank holds it whole, and trains as one built in full.

Each build runs in its own pair of processes, measured from its baseline after the imports (and after a tiny
model's build brought in every code path), so one build's freed memory cannot hide the next one's.
"""
from __future__ import annotations

import pytest

from gloo import TEXT, job, run_group, train

# 12 layers of width 512 over an 8192-token vocabulary: 47M parameters, 187 MB in fp32, far above the noise
BIG = {"hidden_size": 512, "num_layers": 12, "num_heads": 8}
BIG_TEXT = {**TEXT, "vocab_size": 8192}

pytestmark = pytest.mark.slow


def build_and_train(rank: int, world: int, out_dir: str, partitioned: bool) -> dict:
    import torch

    from raypt.config import JobConfig
    from raypt.engines import Topology, select
    from raypt.engines.device import keep_host_memory
    from raypt.metrics.memory import HostPeak
    from raypt.tasks import get_task

    keep_host_memory(training=False)  # as the worker loop builds
    topology = Topology.data_parallel(world, rank)
    small = job(3)
    get_task("clm")(small, {"text": TEXT}).build_model(0, select(small).partition(small, topology))
    cfg = JobConfig.model_validate({**job(3).model_dump(), "model": {"task": "clm", **BIG}})
    task = get_task("clm")(cfg, {"text": BIG_TEXT})
    with torch.device("meta"):
        full_bytes = 4 * sum(p.numel() for p in task.construct().parameters())
    partition = select(cfg).partition(cfg, topology) if partitioned else None
    with HostPeak() as peak:
        model = task.build_model(cfg.run.seed, partition)
    engine = select(cfg).build(model, cfg, topology)
    return {"peak": peak.above, "full_bytes": full_bytes, "losses": train(task, engine, range(1, 3))}


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("memory"))
    return {kind: run_group(2, build_and_train, out, partitioned=kind == "partitioned")
            for kind in ("partitioned", "full")}


def test_no_rank_holds_the_whole_model_while_building_it(builds):
    for rank in builds["partitioned"]:
        assert rank["peak"] is not None, "no /proc/self/status to measure with"
        assert rank["peak"] < 0.75 * rank["full_bytes"], rank  # half of it, one module gathered, the rest noise
    for rank in builds["full"]:  # the measurement sees a model held whole
        assert rank["peak"] >= rank["full_bytes"], rank


def test_partitioned_build_trains_as_the_full_one(builds):
    partitioned, full = builds["partitioned"][0]["losses"], builds["full"][0]["losses"]
    assert max(abs(a - b) for a, b in zip(partitioned, full)) <= 1e-6, (partitioned, full)
