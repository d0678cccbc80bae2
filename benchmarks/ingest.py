"""Can the loader outrun the trainer, and does it read each byte once? Samples/s and MB/s of raypt's stream (text
and images from local Parquet, text from S3 on moto's server) against the samples/s the quickstart and MAE jobs
consume, each job's data-wait share of step time, and rows read from storage over rows consumed at 1, 2 and 4
ranks on one feed, and how `data prepare` of a 200 MB corpus scales (benchmarks/prepare_scale.py). One invocation, one machine: ratios, not absolute speeds.
Usage: python benchmarks/ingest.py [--steps 40] [--text-batches 1500] [--image-batches 60]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import ray

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import write_result  # noqa: E402
from prepare_scale import prepare_figures  # noqa: E402

from raypt import config, storage  # noqa: E402
from raypt.driver import init_ray, train  # noqa: E402
from raypt.metrics.sink import read_metrics  # noqa: E402

JOBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs")


def job(name: str, *overrides: str):
    cfg = config.load(os.path.join(JOBS, f"{name}.yaml"), list(overrides), check_data=False)
    if not os.path.exists(os.path.join(cfg.data.path, "manifest.json")):
        from raypt.data.prepare import prepare

        prepare(cfg.data.path, cfg.data.prepare)
    return cfg


def loader_rate(cfg, path: str, batches: int) -> tuple[float, float]:
    """(samples/s, MB/s) of one stream delivering whole global batches, as fast as it can."""
    from raypt.data.manifest import read_manifest
    from raypt.data.mix import MixPlan
    from raypt.data.split import Split
    from raypt.data.stream import RankStream

    manifest = read_manifest(path)
    plan = MixPlan([(0, np.array([1.0]))], cfg.train.global_batch, np.array([1]))
    stream = RankStream([manifest], plan, "train", 0, True, Split(cfg.train.global_batch, 1, cfg.train.global_batch),
                        0, cfg.data.prefetch_batches, cfg.data.image, cfg.data.audio)
    per_sample = sum(f["bytes"] for f in manifest["splits"]["train"]["files"]) / manifest["splits"]["train"]["rows"]
    it = stream.batches(0, batches + 2)
    next(it), next(it)  # start-up (task processes, first reads) is not throughput
    t, samples = time.perf_counter(), 0
    for batch in it:
        samples += len(batch["sample_id"])
    seconds = time.perf_counter() - t
    return samples / seconds, samples * per_sample / seconds / 1e6


def read_amplification(cfg, world: int, batches: int) -> float:
    """Rows read from storage over rows consumed: `world` ranks (rank streams in this process, turn by turn, a
    window each) on one feed actor, as a run's ranks are, over `batches` global batches of the job's mix."""
    from raypt.data.feed import start_feed
    from raypt.data.manifest import read_manifest
    from raypt.data.mix import MixPlan
    from raypt.data.split import Split
    from raypt.data.stream import RankStream

    manifests = [read_manifest(s.path) for s in cfg.data.mix()]
    c = cfg.train
    plan = MixPlan(cfg.data.stage_weights(), c.global_batch, np.ones(len(manifests)))
    feed = start_feed(cfg.data.reader_cpus)
    streams = [RankStream(manifests, plan, "train", cfg.run.seed, True, Split(c.global_batch, world, c.micro_batch),
                          rank, cfg.data.prefetch_batches, cfg.data.image, cfg.data.audio, feed)
               for rank in range(world)]
    iters = [s.batches(0, batches) for s in streams]
    per_turn = Split(c.global_batch, world, c.micro_batch).accumulation * streams[0].mix.window
    consumed, live = 0, list(iters)
    while live:
        for it in list(live):
            for _ in range(per_turn):
                try:
                    consumed += int((next(it)["sample_id"] >= 0).sum())
                except StopIteration:
                    live.remove(it)
                    break
    assert consumed == batches * c.global_batch, (consumed, batches * c.global_batch)
    read = sum(ray.get(feed.rows_read.remote()).values())
    ray.kill(feed)
    return read / consumed


def consumption(cfg, name: str, steps: int, storage_dir: str) -> tuple[float, float]:
    """(samples/s the trainer takes, data wait / step time) of a short run of the job, start-up excluded."""
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every = steps, steps, steps
    cfg.run.storage, cfg.run.name = storage_dir, f"ingest-{name}"
    records = [r for r in read_metrics(train(cfg)) if r.get("loss") is not None][2:]
    step_time = sum(r["step_time_s"] for r in records)
    return cfg.train.global_batch * len(records) / step_time, sum(r["data_wait_s"] for r in records) / step_time


def s3_copy(local: str) -> tuple[subprocess.Popen, str]:
    """The prepared text shards on moto's S3 server on 127.0.0.1, reached as a user's S3 would be."""
    import socket

    import boto3
    import pyarrow.fs as pafs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")
    for _ in range(100):
        try:
            boto3.client("s3").create_bucket(Bucket="ingest")
            break
        except Exception:  # the server is still starting
            time.sleep(0.1)
    fs, path = storage.resolve("s3://ingest/text")
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return server, "s3://ingest/text"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--text-batches", type=int, default=1500, help="enough to span many read windows")
    ap.add_argument("--image-batches", type=int, default=60)
    ap.add_argument("--amplification-batches", type=int, default=1500, help="global batches each read-amplification "
                    "figure spans: a run that ends inside a shuffle block has read all of it")
    ap.add_argument("--prepare-corpus-mb", type=float, default=200, help="size of the corpus `data prepare` "
                    "streams at 1, 2 and 4 tasks (benchmarks/prepare_scale.py)")
    args = ap.parse_args()
    # First, before this process starts Ray: each preparation runs in a fresh process with its own cluster.
    prepared = prepare_figures(args.prepare_corpus_mb)
    text, image = job("quickstart"), job("mae")
    server, s3_text = s3_copy(text.data.path)  # before Ray starts, so its processes see the endpoint
    try:
        init_ray()
        runs = tempfile.mkdtemp(prefix="raypt-ingest-")
        amplification = {f"read_amplification_w{w}": read_amplification(text, w, args.amplification_batches)
                         for w in (1, 2, 4)}
        amplification["read_amplification_image_w2"] = read_amplification(image, 2, args.amplification_batches // 25)
        amplification["read_amplification_quickstart_run_w2"] = read_amplification(text, 2, text.train.steps)
        text_rate, text_mb = loader_rate(text, text.data.path, args.text_batches)
        image_rate, image_mb = loader_rate(image, image.data.path, args.image_batches)
        s3_rate, s3_mb = loader_rate(text, s3_text, args.text_batches)
        text_need, text_wait = consumption(text, "quickstart", args.steps, runs)
        image_need, image_wait = consumption(image, "mae", args.steps, runs)
    finally:
        server.terminate()
    figures = {
        **amplification,
        **prepared,
        "loader_vs_consumption_text": text_rate / text_need,
        "loader_vs_consumption_image": image_rate / image_need,
        "loader_vs_consumption_text_s3": s3_rate / text_need,
        "data_wait_fraction_quickstart": text_wait, "data_wait_fraction_mae": image_wait,
        "loader_samples_per_s": {"text": text_rate, "image": image_rate, "text_s3": s3_rate},
        "loader_mb_per_s": {"text": text_mb, "image": image_mb, "text_s3": s3_mb},
        "trainer_samples_per_s": {"quickstart": text_need, "mae": image_need},
    }
    write_result("ingest", figures, steps=args.steps, text_batches=args.text_batches,
                 image_batches=args.image_batches, amplification_batches=args.amplification_batches)


if __name__ == "__main__":
    main()
