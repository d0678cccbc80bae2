"""In-memory snapshots: every `checkpoint.memory_every` steps each rank's share of the training state, the same
bytes its checkpoint file would hold, goes into Ray's object store on its own node and on one other.

Ray's ownership rule decides the design: an object is lost with the process that owns it, whatever copies exist.
A worker that `ray.put`s its share loses it when it dies, which is exactly when it is needed. So one holder per
node takes each share and keeps it: the holder keeps the array Ray hands it, a view of the shared memory the
share arrived in, which the object store cannot free while the holder maps it, even after the sender died (no
second copy; restoring reads it through the holder). The holders outlive any worker group. The `Snapshots`
registry (beside the driver, which owns it; it creates the other holders, so it owns them) is itself the holder of
its own node, since every idle Ray worker process wakes each 10 ms and a spare one costs a rank's core about 1 %.
It keeps the index: which shares of which step are held where, each rank's index entries and rank 0's index body.
A snapshot is complete when every rank of its world recorded its share; the registry then drops every older
step, so at most the newest complete one and the one being assembled are held.

After a failure, `newest` gives the newest complete snapshot whose every share still has a live holder. The
restarted group reads it through the same `Reader` as a durable checkpoint (at any world size), each rank
fetching the files it reads from the nearest holder. Durable checkpoints are written as before: a snapshot is
never the only copy of a step that `checkpoint.every` promised; if the registry itself is gone (with its
holder), the run resumes from them and goes on without snapshots.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Optional

import pyarrow as pa
import ray
from ray.exceptions import RayError

from raypt.checkpoint.index import CheckpointError, Reader

GiB = 1 << 30


def _size(n: int) -> str:
    return f"{n / GiB:.3g} GiB" if n >= GiB else f"{n / (1 << 20):.3g} MiB"


class Holder:
    """Keeps the snapshot shares sent to its node, up to `limit_gb` (HolderActor is this class as an actor)."""

    def __init__(self, limit_gb: float, node: str):
        self.limit_gb, self.limit, self.node, self.shares = limit_gb, limit_gb * GiB, node, {}

    def keep(self, key: tuple[int, int], data: Any) -> Optional[str]:
        """`data` arrives resolved, a read-only view of the sender's object in this node's store; keeping the view
        keeps those bytes. Returns why it was not kept (over the limit), else None."""
        held = sum(v.nbytes for k, v in self.shares.items() if k != key)
        if held + data.nbytes > self.limit:
            return (f"checkpoint.memory_limit_gb={self.limit_gb:g}: a snapshot share of {_size(data.nbytes)} does "
                    f"not fit beside the {_size(held)} held on node {self.node[:8]}; raise it, or snapshot less "
                    "often (checkpoint.memory_every)")
        self.shares[key] = data
        return None

    def share(self, key: tuple[int, int]) -> Any:
        return self.shares[key]

    def drop(self, below: int, above: Optional[int] = None) -> None:
        """Every share of a step below `below` (or above `above`)."""
        for key in [k for k in self.shares if k[0] < below or (above is not None and k[0] > above)]:
            del self.shares[key]

    def held_bytes(self) -> int:
        return sum(v.nbytes for v in self.shares.values())


HolderActor = ray.remote(num_cpus=0)(Holder)


@ray.remote(num_cpus=0)
class Snapshots(Holder):
    """The run's snapshot index, the holder of its own node, and the holders of the other nodes that run a rank."""

    def __init__(self, limit_gb: float):
        context = ray.get_runtime_context()
        super().__init__(limit_gb, context.get_node_id())
        self.holders: dict[str, Any] = {self.node: context.current_actor}
        self.steps: dict[int, dict] = {}  # step -> {"world", "body", "ranks": {rank: (entries, file, nodes)}}

    def _holder(self, node: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if node not in self.holders:
            self.holders[node] = HolderActor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(self.limit_gb, node)
        return self.holders[node]

    def _drop(self, node: str, below: int, above: Optional[int] = None) -> Optional[Any]:
        """Drop on the holder of `node`: this actor's own shares at once (it cannot wait on a call to itself),
        another holder's through a call whose ref is returned."""
        if node == self.node:
            return self.drop(below, above)
        return self.holders[node].drop.remote(below, above)

    def holders_for(self, node: str) -> list[tuple[str, Any]]:
        """The holder on `node` and one on another live node (the next in a ring of the cluster's nodes, so the
        replicas spread), if the cluster has another."""
        alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        others = [n for n in alive[alive.index(node) + 1:] + alive[:alive.index(node)]] if node in alive else []
        return [(n, self._holder(n)) for n in [node, *others[:1]]]

    def record(self, step: int, world: int, rank: int, share: dict, nodes: list[str],
               body: Optional[dict]) -> None:
        """Rank `rank` holds its share of `step` on `nodes`; the step's older snapshots go once it is complete."""
        entry = self.steps.setdefault(step, {"world": world, "body": None, "ranks": {}})
        entry["ranks"][rank] = (share, nodes)
        entry["body"] = body if body is not None else entry["body"]
        if len(entry["ranks"]) == world and entry["body"] is not None:
            for old in [s for s in self.steps if s < step]:
                del self.steps[old]
            for node in self.holders:
                self._drop(node, step)

    def begin(self, step: int) -> None:
        """A worker group resumed at `step`: whatever is newer, or incomplete, came from the group that failed;
        holders that died (with their node, or killed) are replaced when next asked for."""
        for s in [s for s, e in self.steps.items() if s > step or len(e["ranks"]) < e["world"]]:
            del self.steps[s]
        for node in list(self.holders):
            try:
                dropped = self._drop(node, min(self.steps, default=step), above=step)
                if dropped is not None:
                    ray.get(dropped, timeout=30)
            except (RayError, ray.exceptions.GetTimeoutError):
                self.forget(node)

    def forget(self, node: str) -> None:
        """The holder on `node` is gone: a new one takes its place when next asked for."""
        if node != self.node:
            self.holders.pop(node, None)

    def newest(self, at: Optional[int] = None) -> tuple[Optional[dict], list[str]]:
        """(the newest complete snapshot (of step `at`, if given) whose every share has a live holder, as {"step",
        "body", "files": {file: {..., "holders": [(node, holder)]}}}, or None; why each newer one was passed
        over)."""
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        passed = []
        for step in sorted((s for s in self.steps if at is None or s == at), reverse=True):
            entry = self.steps[step]
            if len(entry["ranks"]) < entry["world"] or entry["body"] is None:
                passed.append(f"the in-memory snapshot of step {step} is incomplete "
                              f"({len(entry['ranks'])} of {entry['world']} shares)")
                continue
            files, tensors, lost = {}, {}, []
            for rank, (share, nodes) in sorted(entry["ranks"].items()):
                live = [(n, self.holders[n]) for n in nodes if n in alive and n in self.holders]
                if not live:
                    lost.append(f"rank {rank}'s share went with its holders on node(s) "
                                f"{', '.join(n[:8] for n in nodes)}")
                files[share["file"]] = {"size": share["size"], "crc32": share["crc32"], "holders": live,
                                        "key": (step, rank)}
                tensors.update(share["tensors"])
            if lost:
                passed.append(f"the in-memory snapshot of step {step} is lost: {'; '.join(lost)}")
                continue
            body = {**entry["body"], "files": {k: {"size": v["size"], "crc32": v["crc32"]} for k, v in files.items()},
                    "tensors": tensors}
            return {"step": step, "body": body, "files": files}, passed
        return None, passed


def registry_gone(error: Exception) -> str:
    """Why snapshots stopped when the registry's process died (it is also its node's holder)."""
    return f"the in-memory snapshot registry is gone, and the shares its node held with it ({type(error).__name__})"


def start_snapshots(memory_every: int, limit_gb: float) -> Optional[Any]:
    """The run's registry, beside this driver, which owns it (and so outlives every worker group); None when
    snapshots are off."""
    if not memory_every:
        return None
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return Snapshots.options(scheduling_strategy=here).remote(limit_gb)


def memory_reader(snapshot: dict) -> Reader:
    """A Reader of a snapshot `Snapshots.newest` gave: each file fetched whole (once) from its holder on this
    node, else from the other; a share no holder gives is a CheckpointError."""
    here = ray.get_runtime_context().get_node_id()

    def opener(name: str) -> pa.NativeFile:
        f, errors = snapshot["files"][name], []
        for _, holder in sorted(f["holders"], key=lambda nh: nh[0] != here):
            try:
                return pa.BufferReader(pa.py_buffer(ray.get(holder.share.remote(tuple(f["key"])))))
            except (RayError, KeyError) as e:
                errors.append(type(e).__name__)
        raise CheckpointError(f"the in-memory snapshot of step {snapshot['step']}: no holder gives {name} "
                              f"({', '.join(errors) or 'none alive'})")

    return Reader(f"memory://step{snapshot['step']:06d}", body=snapshot["body"], opener=opener)


class Sender:
    """A rank's side: its share copied into one host buffer at the step (the only part that holds training up),
    then put, handed to the holders and recorded on one background thread, one snapshot in flight."""

    def __init__(self, registry: Any, rank: int, world: int):
        self.registry, self.rank, self.world = registry, rank, world
        self.node = ray.get_runtime_context().get_node_id()
        self.holders: Optional[list] = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypt-snapshot")
        self.pending: Optional[Future] = None

    def submit(self, engine: Any, step: int, body: Optional[dict], hooks: dict, after: Optional[Any] = None) -> None:
        """`after`: an object ref (the sink's barrier) the record of this snapshot waits for. Call `wait` first."""
        from raypt.checkpoint.tensorfile import CODES, to_buffer
        from raypt.checkpoint.write import file_name, own_share

        entries, stored = own_share(engine, hooks, self.rank, self.world)
        data, crc = to_buffer(stored)
        name = file_name(self.rank, self.world)
        for key, tensor in stored:
            entries[key].update(file=name, dtype=CODES[tensor.dtype])
        share = {"file": name, "size": int(data.nbytes), "crc32": crc, "tensors": entries}
        self.pending = self.pool.submit(self._send, step, data, share, body, after)

    def _send(self, step: int, data: Any, share: dict, body: Optional[dict],
              after: Any) -> Optional[tuple[str, bool]]:
        try:
            if self.holders is None:
                self.holders = ray.get(self.registry.holders_for.remote(self.node))
        except RayError as e:
            return registry_gone(e), True
        ref = ray.put(data)
        kept = [holder.keep.remote((step, self.rank), ref) for _, holder in self.holders]  # both at once
        for (node, _), answer in zip(self.holders, kept):
            try:
                refused = ray.get(answer)
            except RayError as e:  # its node went, or it was killed: the next snapshot asks for another
                self.registry.forget.remote(node)
                self.holders = None
                return f"the in-memory snapshot of step {step} was not kept: its holder on node {node[:8]} is " \
                       f"gone ({type(e).__name__})", False
            if refused:
                return refused, True
        if after is not None:
            ray.get(after)
        try:
            ray.get(self.registry.record.remote(step, self.world, self.rank, share, [n for n, _ in self.holders],
                                                body))
        except RayError as e:
            return registry_gone(e), True
        return None

    def wait(self) -> Optional[tuple[str, bool]]:
        """The snapshot in flight is held and recorded; else (why not, whether snapshots cannot go on)."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        return pending.result()
