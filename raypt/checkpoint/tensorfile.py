"""safetensors files written and read one tensor (or one slice of a tensor) at a time, locally or on S3.

The safetensors library serialises a whole dict into one buffer and reads through mmap of a local file, so a
rank saving its share would hold it twice and a rank restoring from S3 would first download whole files. The
format is simple enough to stream: an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the bytes. Files written here load with `safetensors.safe_open`, and files
written by any safetensors writer read here.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from contextlib import nullcontext
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
CODES = {v: k for k, v in DTYPES.items()}


def raw(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes without a copy (bf16 and bool through a byte view)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _head(tensors: list[tuple[str, torch.Tensor]]) -> tuple[bytes, int]:
    """The file's first bytes (length and JSON header) and the size of the data after them."""
    header, offset = {}, 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text, offset


def write(path: str, tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int, dict[str, int]]:
    """Stream (name, tensor) pairs into one safetensors file: (size, CRC-32 of the file, CRC-32 of each
    tensor's bytes). Host memory beyond the tensors themselves: one tensor's copy off the device."""
    tensors = list(tensors)
    head, size = _head(tensors)
    crcs, crc = {}, zlib.crc32(head)
    with open(path, "wb") as f:
        f.write(head)
        for name, t in tensors:
            data = raw(t)
            f.write(memoryview(data))
            crcs[name], crc = zlib.crc32(data), zlib.crc32(data, crc)
    return len(head) + size, crc, crcs


def to_buffer(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[np.ndarray, int]:
    """The same file's bytes in one host buffer, each tensor copied once (an in-memory snapshot), and the file's
    CRC-32, taken in the same pass while each tensor's bytes are in cache."""
    tensors = list(tensors)
    head, size = _head(tensors)
    out = np.empty(len(head) + size, dtype=np.uint8)
    out[:len(head)] = np.frombuffer(head, dtype=np.uint8)
    at, crc = len(head), zlib.crc32(head)
    for _, t in tensors:
        data = raw(t)
        out[at:at + len(data)] = data
        crc, at = zlib.crc32(data, crc), at + len(data)
    return out, crc


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


class TensorFile:
    """One safetensors file opened for ranged reads: a local file, S3 range requests, or a buffer in memory (any
    pyarrow random-access file). `bytes_read` counts what this process fetched from it, header included."""

    def __init__(self, file: pa.NativeFile):
        self.file = file
        self.bytes_read = 0
        (length,) = struct.unpack("<Q", self._read(0, 8))
        if length > self.file.size():
            raise ValueError(f"header length {length} beyond the file's {self.file.size()} bytes")
        header = json.loads(self._read(8, length))
        header.pop("__metadata__", None)
        self.entries = {k: Entry(DTYPES[v["dtype"]], tuple(v["shape"]), 8 + length + v["data_offsets"][0])
                        for k, v in header.items()}

    def _read(self, offset: int, nbytes: int) -> bytes:
        data = self.file.read_at(nbytes, offset)
        self.bytes_read += len(data)
        if len(data) != nbytes:
            raise ValueError(f"{nbytes} bytes at {offset} requested, {len(data)} read: the file is cut short")
        return data

    def flat(self, name: str, start: int, stop: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor: only those bytes are read. Into `out` when given (read
        in place where it is a contiguous host tensor of the stored dtype, else through one buffer), else into a
        new tensor of the stored dtype."""
        e = self.entries[name]
        direct = out is None or (out.device.type == "cpu" and out.dtype == e.dtype and out.is_contiguous())
        buffer = torch.empty(stop - start, dtype=e.dtype) if not direct or out is None else out.detach()
        if len(buffer):
            self.file.seek(e.begin + start * buffer.element_size())
            got = self.file.readinto(buffer.view(torch.uint8).numpy())
            self.bytes_read += got
            if got != buffer.numel() * buffer.element_size():
                raise ValueError(f"{name}: the file ends before elements [{start}, {stop})")
        if out is None or direct:
            return buffer if out is None else out
        return out.copy_(buffer)

    def close(self) -> None:
        self.file.close()


def file_crc32(fs: pafs.FileSystem, path: str, copy_to: Optional[str] = None) -> int:
    """CRC-32 of a whole file, streamed in 16 MiB chunks (zlib's runs at GB/s: cheap beside the read); with
    `copy_to`, the bytes are also written to that local path in the same pass."""
    crc = 0
    with fs.open_input_stream(path) as f, open(copy_to, "wb") if copy_to else nullcontext() as out:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
            if out is not None:
                out.write(chunk)
    return crc

