"""The gloo tier: checkpoint traffic is each rank's share. A 2-rank ZeRO-3 group writes its own slices (nothing
gathered); restored from S3 (moto's server, through pyarrow as a user's S3) each rank fetches exactly its share,
and one rank alone fetches everything; both continue as the uninterrupted run did.
"""
from __future__ import annotations

import json
import math
import os

import boto3
import pytest

from gloo import TEXT, job, run_group, train


def save_at_step_2(rank: int, world: int, out_dir: str) -> dict:
    from raypt.checkpoint import TrainState, save_checkpoint
    from raypt.engines import Topology, select
    from raypt.tasks import get_task

    cfg, topology = job(3), Topology.data_parallel(world, rank)
    task = get_task("clm")(cfg, {"text": TEXT})
    engine = select(cfg).build(task.build_model(cfg.run.seed, select(cfg).partition(cfg, topology)), cfg, topology)
    losses = train(task, engine, range(1, 3))
    save_checkpoint(engine, os.path.join(out_dir, "run", "step000002"), TrainState(step=2, world_size=world), {},
                    cfg.model_dump(mode="json"), cfg.trajectory())
    return {"losses": losses + train(task, engine, range(3, 5))}


def resume(rank: int, world: int, out_dir: str, uri: str) -> dict:
    from raypt.checkpoint import newest_verified
    from raypt.engines import Topology, select
    from raypt.tasks import get_task

    cfg, topology = job(3), Topology.data_parallel(world, rank)
    task = get_task("clm")(cfg, {"text": TEXT})
    with newest_verified(uri, None, print) as reader:
        model = task.build_model(cfg.run.seed, select(cfg).partition(cfg, topology))
        engine = select(cfg).build(model, cfg, topology, reader)
        step, fetched = reader.state.step, reader.bytes_read
    return {"step": step, "fetched": fetched, "losses": train(task, engine, range(step + 1, 5))}


@pytest.fixture(scope="module")
def on_s3(tmp_path_factory, s3_endpoint) -> tuple[str, str, list[float]]:
    from raypt import storage

    out = str(tmp_path_factory.mktemp("sliced"))
    losses = run_group(2, save_at_step_2, out)[0]["losses"]
    boto3.client("s3").create_bucket(Bucket="raypt-sliced")
    storage.copy_tree(os.path.join(out, "run"), "s3://raypt-sliced/run")
    return out, "s3://raypt-sliced/run", losses


def test_each_rank_writes_its_own_slices(on_s3):
    out, _, _ = on_s3
    index = json.load(open(os.path.join(out, "run", "step000002", "raypt_state.json")))
    params = [e for e in index["tensors"].values() if e.get("tensor", "").startswith("param/")]
    files = {e["file"] for e in params}
    assert files == {"state-00000-of-00002.safetensors", "state-00001-of-00002.safetensors"}
    for key in {e["tensor"] for e in params}:  # the slices of each parameter tile it
        cuts = sorted(e["slice"] for e in params if e["tensor"] == key)
        shape = next(e["shape"] for e in params if e["tensor"] == key)
        assert cuts[0][0] == 0 and cuts[-1][1] == math.prod(shape), key
        assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:])), key
    sizes = [index["files"][f]["size"] for f in sorted(files)]
    assert max(sizes) < 0.6 * sum(sizes)


def test_restore_from_s3_fetches_each_ranks_share_once(on_s3, tmp_path):
    out, uri, uninterrupted = on_s3
    index = json.load(open(os.path.join(out, "run", "step000002", "raypt_state.json")))
    sizes = [index["files"][f"state-0000{r}-of-00002.safetensors"]["size"] for r in range(2)]
    got = run_group(2, resume, str(tmp_path), uri=uri)
    for rank, seen in enumerate(got):
        assert seen["step"] == 2
        assert seen["fetched"] == sizes[rank]  # its file, verified and kept on local disk; nothing else
        assert max(abs(a - b) for a, b in zip(seen["losses"], uninterrupted[2:])) <= 1e-6
    [alone] = run_group(1, resume, str(tmp_path), uri=uri)
    assert alone["fetched"] == sum(sizes)
    assert max(abs(a - b) for a, b in zip(alone["losses"], uninterrupted[2:])) <= 1e-5
