"""The run's data feed: each row group read from storage once per epoch (or once per run, for a source smaller
than a shuffle block) for every rank, each rank's rows carried to it through Ray's object store.

One feed per run, an actor beside the driver (`start_feed`), so it outlives every worker group: a restart at
any world size asks it for the same deterministic windows. It does index arithmetic and starts tasks, nothing
heavier: row-group reads (`read_chunk`) and window tasks (`assemble`, one per rank and window) run where the
cluster has CPUs, each asking for `data.reader_cpus`. The feed owns every object they return, so an object lost with a
node is rebuilt from its task (Ray's lineage reconstruction), and a task whose process dies is run again: the
same rows either way, so no sample is lost or repeated. A rank keeps `data.prefetch_batches` windows asked for
ahead of the one in use, which also caps the tasks it has in flight.
"""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

import ray

from raypt.data.window import BlockKey, ChunkKey, Mix

RETRIES = 5  # a read or window task whose process died (or whose output was lost with a node) runs again
TASKS_PER_RANK = 2  # read tasks in flight per rank of the world, at most, as many as there are CPUs for them


@ray.remote(max_retries=RETRIES)
def read_chunk(mix: Mix, key: ChunkKey):  # the remote form of Mix.read
    return mix.read(key)


@ray.remote(max_retries=RETRIES)
def assemble(mix: Mix, drill: Optional[dict], start: int, count: int, world: int, rank: int, keys: list[ChunkKey],
             *chunks) -> bytes:
    if drill and rank == drill["rank"] and start <= drill["batch"] < start + count:
        from raypt.hooks.faults import fire_once

        if fire_once(drill["marker"], {"batch": drill["batch"], "rank": rank, "pid": os.getpid()}):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-task: Ray runs it again in another process
    return mix.assemble(start, count, world, rank, dict(zip(keys, chunks)))


class Stream:
    """One mix's row groups in the object store, kept while a shuffle block that some rank of the current world
    still needs holds them (a source smaller than a block stays in memory: read once per run)."""

    def __init__(self, mix: Mix, drill: Optional[dict]):
        self.mix, self.ref, self.drill = mix, ray.put(mix), drill
        self.chunks: dict[ChunkKey, ray.ObjectRef] = {}
        self.blocks: set[BlockKey] = set()  # the blocks windows asked for that are not yet behind every rank
        self.at: dict[tuple[int, int], int] = {}  # (world, rank) -> the window it asked for last
        self.first: dict[int, int] = {}  # world -> the earliest window any of its ranks asked for
        self.running: list[ray.ObjectRef] = []
        # windows assembled for several readers of one data-parallel rank (a pipeline's first and last stage):
        # (start, count, world, rank) -> [the window, readers yet to ask for it]
        self.shared: dict[tuple[int, int, int, int], list] = {}
        self.rows_read = 0

    def window(self, start: int, count: int, world: int, rank: int, cpus: float, readers: int = 1) -> ray.ObjectRef:
        key = (start, count, world, rank)
        if key in self.shared:
            entry = self.shared[key]
            entry[1] -= 1
            if not entry[1]:
                del self.shared[key]
            return entry[0]
        ref = self.assemble(start, count, world, rank, cpus)
        if readers > 1:
            self.shared[key] = [ref, readers - 1]
        return ref

    def assemble(self, start: int, count: int, world: int, rank: int, cpus: float) -> ray.ObjectRef:
        blocks, keys = self.mix.needs(start, count, world, rank)
        self.blocks.update(blocks)
        for key in keys:
            if key not in self.chunks:
                self.chunks[key] = self.submit(world, read_chunk.options(num_cpus=cpus), self.ref, key)
                self.rows_read += self.mix.sources[key[0]].order.files[key[1]]["row_groups"][key[2]]
        ref = self.submit(world, assemble.options(num_cpus=cpus), self.ref, self.drill, start, count, world, rank,
                          keys, *(self.chunks[k] for k in keys))
        self.forget(world, rank, start)
        return ref

    def submit(self, world: int, task: Any, *args: Any) -> ray.ObjectRef:
        """Start a task once fewer than TASKS_PER_RANK x world of this stream's run. The cap keeps readers off
        the ranks' cores, and within the worker processes Ray keeps (fractional CPUs would let it start many
        more, each importing the decoders, only to stop them a second after). Waiting here holds up only later
        requests: the tasks in flight depend on nothing the feed does."""
        self.running = ray.wait(self.running, num_returns=len(self.running), timeout=0, fetch_local=False)[1]
        while len(self.running) >= TASKS_PER_RANK * world:
            self.running = ray.wait(self.running, num_returns=1, fetch_local=False)[1]
        ref = task.remote(*args)
        self.running.append(ref)
        return ref

    def forget(self, world: int, rank: int, start: int) -> None:
        """Drop the row groups of the blocks that lie wholly before the slowest rank's window and of no later
        block: no rank of this world needs them again (a restart that goes back reads them again). A rank not
        heard from yet counts as at the earliest window of its world."""
        self.at[(world, rank)] = start
        self.first[world] = min(self.first.get(world, start), start)
        slowest = min(self.at.get((world, r), self.first[world]) for r in range(world))
        consumed = self.mix.plan.consumed(slowest)
        self.blocks = {k for k in self.blocks if self.mix.sources[k[0]].order.block_end(*k[1:]) > consumed[k[0]]}
        kept = set().union(*(self.mix.chunks_of(k) for k in self.blocks))
        self.chunks = {k: ref for k, ref in self.chunks.items() if k in kept}
        # a reader that never asks (its group restarted): every rank of the world is past the window
        self.shared = {k: v for k, v in self.shared.items() if k[2] != world or k[0] >= slowest}


class Feed:
    """The streams of one run (training, each evaluation split, the probe's sets), by their mix's key. `drill`:
    faults.kill_reader_at_step's {"batch", "rank", "marker"} (raypt/hooks/faults.py), for the training stream."""

    def __init__(self, reader_cpus: float = 0.25, drill: Optional[dict] = None):
        self.cpus, self.drill = reader_cpus, drill
        self.streams: dict[str, Stream] = {}

    def open(self, mix: Mix) -> None:
        if mix.key not in self.streams:
            self.streams[mix.key] = Stream(mix, self.drill if mix.train else None)

    def window(self, key: str, start: int, count: int, world: int, rank: int, readers: int = 1) -> ray.ObjectRef:
        """The packed rows (Mix.assemble) of rank `rank` of `world` in global batches [start, start + count),
        assembled once for the `readers` ranks that ask for them."""
        return self.streams[key].window(start, count, world, rank, self.cpus, readers)

    def rows_read(self) -> dict[str, int]:
        """Rows each stream has read from storage: the measure of read amplification."""
        return {key: s.rows_read for key, s in self.streams.items()}


FeedActor = ray.remote(num_cpus=0, max_restarts=-1)(Feed)


def start_feed(reader_cpus: float, drill: Optional[dict] = None) -> Any:
    """The run's feed actor, on this (the driver's) node: it lives as long as the driver, across restarts."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return FeedActor.options(scheduling_strategy=here).remote(reader_cpus, drill)


def call(feed: Any, method: str, *args: Any) -> Any:
    """A feed method, on the actor (a reference to its result) or on a feed of this process."""
    if isinstance(feed, Feed):
        return getattr(feed, method)(*args)
    return getattr(feed, method).remote(*args)


def fetch(request: Any) -> bytes:
    """A window's packed rows: an actor's answer is a reference to the reference of the window task."""
    value = ray.get(request)
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value
