"""The global order is a pure function of (seed, epoch, manifest); rank slices tile each global batch."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from raypt.data.manifest import read_manifest, shard_uri
from raypt.config import AudioConfig, ImageConfig
from raypt.data.mix import MixPlan, rank_slots
from raypt.data.order import GlobalOrder
from raypt.data.split import Split
from raypt.data.stream import RankStream


def single(global_batch: int) -> MixPlan:
    return MixPlan([(0, np.array([1.0]))], global_batch, np.array([128]))


def rank_positions(first: int, count: int, global_batch: int, world: int, rank: int) -> np.ndarray:
    return rank_slots(single(global_batch), first, count, world, rank)[1]


def sample_ids(manifest, order: GlobalOrder, positions) -> np.ndarray:
    files, groups, rows = order.locate(np.asarray(positions))
    offsets = [np.cumsum([0, *f["row_groups"]]) for f in order.files]
    starts = np.cumsum([0] + [f["rows"] for f in order.files])
    return np.array([starts[f] + offsets[f][g] + r for f, g, r in zip(files, groups, rows)])


def test_each_epoch_is_a_permutation_and_epochs_differ(tiny_data):
    m = read_manifest(tiny_data)
    order = GlobalOrder(m, "train", seed=3)
    first = sample_ids(m, order, range(order.rows))
    second = sample_ids(m, order, range(order.rows, 2 * order.rows))
    assert sorted(first) == list(range(order.rows))
    assert sorted(second) == list(range(order.rows))
    assert not np.array_equal(first, second)
    again = sample_ids(m, GlobalOrder(m, "train", seed=3), range(order.rows))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, sample_ids(m, GlobalOrder(m, "train", seed=4), range(order.rows)))


def test_rank_slices_tile_the_global_batch_at_any_world_size():
    whole = rank_positions(5, 3, 12, 1, 0).reshape(3, 12)
    for world in (2, 3, 4, 5, 6, 7, 12):  # 5 and 7 do not divide 12: shares differ by one
        parts = [rank_positions(5, 3, 12, world, r).reshape(3, -1) for r in range(world)]
        assert {p.shape[1] for p in parts} <= {12 // world, 12 // world + 1}
        assert np.array_equal(np.concatenate(parts, axis=1), whole)


def test_micro_batches_weight_unequal_shares_to_the_global_mean():
    from raypt.data.split import Split

    for world, micro in ((1, 4), (3, 2), (5, 1), (5, 3), (7, 2), (12, 1)):
        split = Split(12, world, micro)
        weights, rows = [], []
        for rank in range(world):
            cuts = split.micro_slices(rank)
            assert len(cuts) == split.accumulation  # every rank calls the model equally often
            assert all(c.stop - c.start <= micro for c, _ in cuts)
            rows.append(sum(c.stop - c.start for c, w in cuts if w))
            weights += [w / (c.stop - c.start) for c, w in cuts if w]
        assert sum(rows) == 12
        # DeepSpeed averages over accumulation x ranks: per-row weights must make that the mean over 12 rows
        assert np.allclose(np.array(weights) / (split.accumulation * world), 1 / 12)


def test_stream_delivers_the_ordered_rows_and_resumes_mid_run(ray_cluster, tiny_data):
    m = read_manifest(tiny_data)
    table = {}
    for f in m["splits"]["train"]["files"]:
        t = pq.read_table(shard_uri(m, f))
        for sid, ids in zip(t.column("sample_id").to_numpy(), t.column("input_ids").to_pylist()):
            table[int(sid)] = ids
    order = GlobalOrder(m, "train", seed=0)
    # 8 over 3 ranks: rank 2 takes 2 samples per batch, in 2 micro-batches like its peers' 3 samples
    stream = RankStream([m], single(8), "train", 0, True, Split(8, 3, 2), rank=2, prefetch=2,
                        image_cfg=ImageConfig(), audio_cfg=AudioConfig())
    full = [b for b in stream.batches(0, 6)]
    assert len(full) == 12 and all(len(b["sample_id"]) == 1 and b["weight"] == 1 * 2 * 3 / 8 for b in full)
    got = np.concatenate([b["sample_id"].numpy() for b in full])
    assert np.array_equal(got, sample_ids(m, order, rank_positions(0, 6, 8, 3, 2)))
    for b in full:
        for sid, ids in zip(b["sample_id"].tolist(), b["input_ids"].tolist()):
            assert table[sid] == ids
    resumed = np.concatenate([b["sample_id"].numpy() for b in stream.batches(4, 2)])
    assert np.array_equal(resumed, got[-len(resumed):])


def test_ranks_on_one_feed_read_each_block_once_and_get_exactly_their_rows(ray_cluster, tiny_data):
    from raypt.data.feed import Feed

    m, feed, world, batches = read_manifest(tiny_data), Feed(), 4, 300
    order = GlobalOrder(m, "train", seed=0)
    streams = [RankStream([m], single(8), "train", 0, True, Split(8, world, 2), rank=r, prefetch=1,
                          image_cfg=ImageConfig(), audio_cfg=AudioConfig(), feed=feed) for r in range(world)]
    for rank, stream in enumerate(streams):  # one after another: the feed keeps what the ranks behind still need
        got = np.concatenate([b["sample_id"].numpy() for b in stream.batches(0, batches)])
        assert np.array_equal(got, sample_ids(m, order, rank_positions(0, batches, 8, world, rank)))
    epochs, blocks, _ = order.blocks(np.arange(batches * 8))
    assert len({(int(e), int(b)) for e, b in zip(epochs, blocks)}) >= 3  # the run crosses shuffle blocks
    files, groups, _ = order.locate(np.arange(batches * 8))
    held = {(int(f), int(g)) for f, g in zip(files, groups)}  # the row groups the run's samples lie in
    rows = sum(order.files[f]["row_groups"][g] for f, g in held)
    assert sum(feed.rows_read().values()) == rows  # each read once, not once per rank


def test_stream_reads_shards_from_s3_as_from_local_disk(ray_cluster, s3_endpoint, tiny_data):
    import boto3
    import pyarrow.fs as pafs

    from raypt import storage

    boto3.client("s3").create_bucket(Bucket="raypt-shards")
    fs, path = storage.resolve("s3://raypt-shards/stdlib")
    pafs.copy_files(tiny_data, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    streams = [RankStream([read_manifest(root)], single(8), "train", 0, True, Split(8, 2, 4), rank=0, prefetch=2,
                          image_cfg=ImageConfig(), audio_cfg=AudioConfig())
               for root in (tiny_data, "s3://raypt-shards/stdlib")]
    local, remote = ([b for b in s.batches(3, 4)] for s in streams)
    assert len(local) == len(remote) == 4 * 8 // 2 // 4
    for a, b in zip(local, remote):
        assert torch.equal(a["sample_id"], b["sample_id"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_a_pipelines_first_and_last_stage_share_one_window_and_middle_stages_read_nothing(ray_cluster, tiny_data):
    """Both readers of a data-parallel rank get the one window the feed assembled; a third request (a restarted
    reader) gets a fresh one with the same rows. A stage that reads nothing gets its micro-batches' weights only."""
    import ray

    from raypt.data.feed import Feed
    from raypt.data.stream import Blank

    feed, split = Feed(), Split(8, 1, 4)
    stream = RankStream([read_manifest(tiny_data)], single(8), "train", 0, True, split, rank=0, prefetch=1,
                        image_cfg=ImageConfig(), audio_cfg=AudioConfig(), feed=feed, readers=2)
    feed.open(stream.mix)
    first, last, again = (feed.window(stream.mix.key, 0, 2, 1, 0, readers=2) for _ in range(3))
    assert first == last and again != first and ray.get(again) == ray.get(first)
    assert feed.streams[stream.mix.key].shared == {(0, 2, 1, 0): [again, 1]}  # the fresh one awaits its partner
    blanks = list(Blank(split, 0).batches(0, 3))
    assert [b["weight"] for b in blanks] == [w for _, w in split.micro_slices(0)] * 3
    assert all(len(b["sample_id"]) == 0 and set(b) == {"sample_id", "weight"} for b in blanks)
