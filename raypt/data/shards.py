"""The one writer of a prepared dataset: rows arrive in input order and leave as shards of ROWS_PER_FILE rows, each
row group written as soon as it is full (memory holds one group, not a shard), with a running `sample_id`; each
shard's row groups, size and sha256 are listed for the manifest. Every group is written from one contiguous array,
so a shard's bytes depend on its rows alone, never on how the work was cut into tasks.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raypt.data.manifest import MANIFEST

ROWS_PER_FILE = 4096


class HashingSink:
    """A file-like target for pq.ParquetWriter that hashes and counts what it forwards to an output stream."""

    def __init__(self, out: pa.NativeFile):
        self.out, self.sha, self.size, self.closed = out, hashlib.sha256(), 0, False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class Shards:
    """The files written into one dataset folder, so a preparation that fails part-way removes them again."""

    def __init__(self, fs: pafs.FileSystem, root: str, rows_per_group: int):
        self.fs, self.root, self.rows_per_group = fs, root, rows_per_group
        self.written: list[str] = []

    def start(self) -> None:
        """Before the first shard: a manifest left by an earlier preparation would name files this one replaces."""
        try:
            self.fs.delete_file(f"{self.root}/{MANIFEST}")
        except FileNotFoundError:
            pass

    def remove(self) -> None:
        for path in self.written:
            try:
                self.fs.delete_file(path)
            except OSError:  # best effort: the error that got us here is the one to report
                pass


class ShardWriter:
    """One split's shards."""

    def __init__(self, shards: Shards, split: str):
        self.shards, self.split = shards, split
        self.files: list[dict] = []
        self.rows = 0  # written, over all shards
        self.buffer: list[dict[str, pa.Array]] = []
        self.buffered = 0
        self.writer: pq.ParquetWriter | None = None

    def add(self, columns: dict[str, pa.Array]) -> None:
        """Append rows (equal-length columns); every full row group is written at once."""
        n = len(next(iter(columns.values())))
        at = 0
        while at < n:
            take = min(n - at, self._room() - self.buffered)
            self.buffer.append({k: v.slice(at, take) for k, v in columns.items()})
            self.buffered += take
            at += take
            if self.buffered == self._room():
                self._write_group()

    def close(self) -> dict:
        """The split's entry for the manifest, once its last rows are written."""
        if self.buffered:
            self._write_group()
        self._end_shard()
        return {"rows": self.rows, "files": self.files}

    def _room(self) -> int:
        """Rows the next row group takes: rows_per_group, or what the current shard has left."""
        in_shard = self.rows - ROWS_PER_FILE * len(self.files)
        return min(self.shards.rows_per_group, ROWS_PER_FILE - in_shard)

    def _write_group(self) -> None:
        names = list(self.buffer[0])
        group = pa.table({"sample_id": pa.array(np.arange(self.rows, self.rows + self.buffered, dtype=np.int64)),
                          **{k: pa.concat_arrays([part[k] for part in self.buffer]) for k in names}})
        if self.writer is None:
            path = f"{self.split}-{len(self.files):05d}.parquet"
            self.out = self.shards.fs.open_output_stream(f"{self.shards.root}/{path}")
            self.shards.written.append(f"{self.shards.root}/{path}")
            self.sink, self.path, self.groups = HashingSink(self.out), path, []
            self.writer = pq.ParquetWriter(pa.PythonFile(self.sink, mode="w"), group.schema, compression="zstd")
        self.writer.write_table(group, row_group_size=len(group))
        self.groups.append(len(group))
        self.rows += len(group)
        self.buffer, self.buffered = [], 0
        if sum(self.groups) == ROWS_PER_FILE:
            self._end_shard()

    def _end_shard(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.out.close()
        self.files.append({"path": self.path, "rows": sum(self.groups), "row_groups": self.groups,
                           "bytes": self.sink.size, "sha256": self.sink.sha.hexdigest()})
        self.writer = None


class TokenPacker:
    """Documents' tokens (each already followed by its EOS) packed into rows of seq_len across document
    boundaries, in arrival order; the ragged tail at the end is dropped."""

    def __init__(self, writer: ShardWriter, seq_len: int):
        self.writer, self.seq_len = writer, seq_len
        self.tail = np.zeros(0, dtype=np.int32)

    def add(self, tokens: np.ndarray) -> None:
        flat = np.concatenate([self.tail, tokens])
        n = len(flat) // self.seq_len
        if n:
            rows = pa.FixedSizeListArray.from_arrays(pa.array(flat[: n * self.seq_len]), self.seq_len)
            self.writer.add({"input_ids": rows})
        self.tail = flat[n * self.seq_len:].copy()
