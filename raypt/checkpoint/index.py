"""The checkpoint index (`raypt_state.json`): one versioned file that says what a checkpoint holds.

Format 2 lists every file (size, CRC-32) and every stored tensor (its file, dtype, CRC-32) by name: `param/NAME`,
`exp_avg/NAME`, `exp_avg_sq/NAME` for each model parameter, and `hook/HOOK/NAME` for what a loop hook keeps; plus
each hook's JSON state, the resolved job config and the settings that shape the trajectory. A tensor is stored
whole (`slice` null) or as slices of its flattened form, each where the rank holding it wrote it: an entry named
`KEY[start:stop]` with `tensor: KEY`, `slice: [start, stop]` and the full `shape`. Slices tile the tensor; which
ranks wrote them is not recorded because no reader needs it, so any world size, stage or engine reads any range.
Format 1 (before the index) listed only file sizes; such checkpoints still load: their tensors are found by
reading the shards' own headers. Rank 0 writes the index after every rank has written its shard, so a
checkpoint without one was never committed.

Trust comes in two steps: `read_state` checks that every listed file is there at its committed size (cheap, one
listing); `Reader.verify` checks the bytes of a rank's share of the files against their CRC-32s (format 1, which
has none: that they parse), the ranks together covering every file.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from raypt import storage
from raypt.checkpoint.tensorfile import TensorFile, file_crc32

STATE = "raypt_state.json"
FORMAT = 2
PARAM, MOMENTS = "param", ("exp_avg", "exp_avg_sq")  # the kinds of per-parameter state a checkpoint holds


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be trusted: missing or unreadable files, sizes or checksums that differ from the
    committed ones."""


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    world_size: int = 0
    config_digest: str = ""


def file_size(entry) -> int:
    """Format 1 stored a bare size, format 2 a dict."""
    return entry if isinstance(entry, int) else entry["size"]


def read_state(uri: str) -> tuple[TrainState, dict]:
    """Trust only a committed, complete checkpoint: index present and every listed file at its size."""
    fs, path = storage.resolve(uri)
    try:
        with fs.open_input_stream(f"{path}/{STATE}") as f:
            body = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        raise CheckpointError(f"{uri}: no readable {STATE}; the checkpoint was never committed") from None
    names = list(body["files"])
    infos = fs.get_file_info([f"{path}/{n}" for n in names])
    for name, info in zip(names, infos):
        want = file_size(body["files"][name])
        if info.size != want:
            found = "missing" if info.size is None else f"{info.size} bytes"
            raise CheckpointError(f"{uri}: {name} is {found}, committed as {want} bytes")
    return train_state(body), body


def train_state(body: dict) -> TrainState:
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in body.items() if k in fields})


@dataclass(frozen=True)
class Part:
    """Where elements [start, stop) of a tensor's flattened form are stored: a file and its name there."""
    file: str
    stored: str
    start: int
    stop: int


class Reader:
    """A committed checkpoint, local or on S3, read by tensor name whatever the world size that wrote it: whole
    tensors, or any flat range of one, fetching only the bytes of the files that hold it. `origin`: where the
    checkpoint was copied from, to name files in errors (the checkpoint itself by default). `body` and `opener`:
    a checkpoint that is in no storage (an in-memory snapshot, raypt/checkpoint/memory.py): its index, and each
    of its files by name as a pyarrow random-access file."""

    holds_optimizer = True  # Adam's moments and step counter are restored with the weights (see init.Initial)

    def __init__(self, directory: str, origin: Optional[str] = None, body: Optional[dict] = None,
                 opener: Optional[Callable[[str], pa.NativeFile]] = None):
        self.directory, self.origin, self.opener = directory, origin or directory, opener
        self.in_memory = body is not None
        if body is None:
            self.fs, self.path = storage.resolve(directory)
            self.state, self.body = read_state(directory)
        else:
            self.fs, self.path, self.state, self.body = None, directory, train_state(body), body
        self.format = self.body.get("format", 1)
        self.files: dict[str, TensorFile] = {}
        self.spool: Optional[str] = None  # where verify keeps the remote files it checked, read from there after
        self.checked = 0  # bytes verify read
        self.parts: dict[str, list[Part]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        if self.format >= 2:
            for stored, e in self.body["tensors"].items():
                key, cut = e.get("tensor", stored), e.get("slice")
                start, stop = cut if cut else (0, math.prod(e["shape"]))
                self.parts.setdefault(key, []).append(Part(e["file"], stored, start, stop))
                self.shapes[key] = tuple(e["shape"])
        else:  # format 1: whole tensors, found in the shards' own headers
            for name in sorted(n for n in self.body["files"] if n.endswith(".safetensors")):
                for key, e in self.open(name).entries.items():
                    self.parts[key], self.shapes[key] = [Part(name, key, 0, e.numel)], e.shape

    def open(self, name: str) -> TensorFile:
        """A file of the checkpoint, its header read (once); an unreadable one is a CheckpointError."""
        if name not in self.files:
            kept = self.spool and os.path.join(self.spool, name)
            try:
                if self.opener:
                    file = self.opener(name)
                elif kept and os.path.exists(kept):
                    file = pafs.LocalFileSystem().open_input_file(kept)
                else:
                    file = self.fs.open_input_file(f"{self.path}/{name}")
                self.files[name] = TensorFile(file)
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{self.origin}/{name} is unreadable: {e}") from None
        return self.files[name]

    @property
    def bytes_read(self) -> int:
        """Bytes this process fetched from the checkpoint's storage: what verify checked, and what the reads
        took from files it did not keep (on S3 a rank's verified share is kept on local disk and read there)."""
        kept = set(os.listdir(self.spool)) if self.spool else set()
        return self.checked + sum(f.bytes_read for n, f in self.files.items() if n not in kept)

    def verify(self, rank: int = 0, world: int = 1) -> None:
        """Check this rank's share of the files that hold tensors (every `world`-th, from `rank`; all by default)
        against their committed CRC-32s, so that the ranks of a restore, exchanging their outcomes, check each
        byte once between them. Format 1 committed no CRCs, so its files need only parse. Raises CheckpointError
        naming the file."""
        names = sorted({p.file for parts in self.parts.values() for p in parts})
        remote = self.opener is None and not isinstance(self.fs, pafs.LocalFileSystem)
        if remote and self.spool is None:
            self.spool = tempfile.mkdtemp(prefix="raypt-restore-")
        for name in names[rank::world]:
            entry = self.body["files"][name]
            if not isinstance(entry, dict):
                self.open(name)
                continue
            try:
                crc = self._buffer_crc(name) if self.opener else \
                    file_crc32(self.fs, f"{self.path}/{name}", os.path.join(self.spool, name) if remote else None)
                self.checked += entry["size"]
            except OSError as e:
                raise CheckpointError(f"{self.origin}/{name} is unreadable: {e}") from None
            if crc != entry["crc32"]:
                raise CheckpointError(f"{self.origin}/{name} has CRC-32 {crc:08x}, committed as "
                                      f"{entry['crc32']:08x}: its bytes changed after it was written")

    def _buffer_crc(self, name: str) -> int:
        file = self.open(name).file
        file.seek(0)
        return zlib.crc32(file.read_buffer())

    @property
    def optimizer_steps(self) -> int:
        return self.body["optimizer_step"]

    @property
    def hooks(self) -> dict[str, dict]:
        return self.body.get("hooks", {})

    @property
    def config(self) -> Optional[dict]:
        return self.body.get("config")

    @property
    def trajectory(self) -> Optional[dict]:
        return self.body.get("trajectory")

    def flat(self, key: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor `key` (into `out` when given, else in its stored dtype),
        from the parts that hold them: one at the world size and stage that wrote it, two or three after a
        resize."""
        parts = [p for p in self.parts[key] if p.start < stop and start < p.stop]
        if sum(min(stop, p.stop) - max(start, p.start) for p in parts) != stop - start:
            raise CheckpointError(f"{self.origin}: {key} holds no elements [{start}, {stop})")
        if out is None:
            dtype = self.open(parts[0].file).entries[parts[0].stored].dtype if parts else torch.float32
            out = torch.empty(stop - start, dtype=dtype)
        for p in parts:
            lo, hi = max(start, p.start), min(stop, p.stop)
            self.open(p.file).flat(p.stored, lo - p.start, hi - p.start, out[lo - start:hi - start])
        return out

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k[len(PARAM) + 1:]: v for k, v in self.shapes.items() if k.startswith(PARAM + "/")}

    def tensor(self, key: str) -> torch.Tensor:
        return self.flat(key, 0, math.prod(self.shapes[key])).view(self.shapes[key])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix/`, whole, by the rest of its key."""
        return {k[len(prefix) + 1:]: self.tensor(k) for k in sorted(self.parts) if k.startswith(prefix + "/")}

    def hook_tensors(self, hook: str) -> dict[str, torch.Tensor]:
        return self.tensors(f"hook/{hook}")

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()
        if self.spool:
            shutil.rmtree(self.spool, ignore_errors=True)


def load_weights(model: torch.nn.Module, directory: str) -> None:
    """A checkpoint's parameters into a model built in full (export, evaluation), whatever wrote them."""
    model.load_state_dict(Reader(directory).tensors("param"), strict=True)
