"""The checkpoint index (`raypt_state.json`): one versioned file that says what a checkpoint holds.

Format 2 lists every file (size, CRC-32) and every tensor (its file, shape, the slice it holds, CRC-32) by name:
`param/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME` for each model parameter, and `hook/HOOK/NAME` for what a loop
hook keeps; plus each hook's JSON state, the resolved job config and the settings that shape the trajectory.
Format 1 (before the index) listed only file sizes; such checkpoints still load: their tensors are found by
reading the shards' own headers. Rank 0 writes the index after every rank has written its shard, so a
checkpoint without one was never committed.

Trust comes in two steps: `read_state` checks that every listed file is there at its committed size (cheap, one
listing); `Reader.verify` checks the bytes of the files one rank reads against their CRC-32s (format 1, which
has none: that they parse).
"""
from __future__ import annotations

import glob
import json
import os
import zlib
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import SafetensorError, safe_open

from raypt import storage

STATE = "raypt_state.json"
FORMAT = 2


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


def file_crc32(path: str) -> int:
    """CRC-32 of a file's bytes, read in chunks into one buffer (zlib's runs at GB/s: cheap beside the read)."""
    crc, buffer = 0, bytearray(1 << 24)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return crc


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
    fields = TrainState.__dataclass_fields__
    return TrainState(**{k: v for k, v in body.items() if k in fields}), body


class Reader:
    """A committed checkpoint in a local folder, read by tensor name whatever the world size that wrote it.
    `origin`: where the folder was copied from, to name files in errors (the folder itself by default)."""

    holds_optimizer = True  # Adam's moments and step counter are restored with the weights (see init.Initial)

    def __init__(self, directory: str, origin: Optional[str] = None):
        self.directory, self.origin = directory, origin or directory
        self.state, self.body = read_state(directory)
        self.format = self.body.get("format", 1)
        self.where = {k: v["file"] for k, v in self.body["tensors"].items()} if self.format >= 2 else self._scan()

    def _scan(self) -> dict[str, str]:
        """Format 1: each tensor's file, from the safetensors headers."""
        where = {}
        for shard in sorted(glob.glob(os.path.join(self.directory, "state-*.safetensors"))):
            where.update({key: os.path.basename(shard) for key in self._keys(os.path.basename(shard))})
        return where

    def _keys(self, name: str) -> list[str]:
        """The tensor names in a safetensors file's header; an unreadable header is a CheckpointError."""
        try:
            with safe_open(os.path.join(self.directory, name), "pt") as f:
                return list(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{self.origin}/{name} is unreadable: {e}") from None

    def verify(self) -> None:
        """Check the bytes of the files a rank restores from against their committed CRC-32: every shard holding
        tensors, as each rank reads every tensor in full (an engine that read only its slice would check fewer).
        Format 1 committed no CRCs, so its files need only parse. Raises CheckpointError naming the file."""
        for name in sorted(set(self.where.values())):
            entry = self.body["files"][name]
            if not isinstance(entry, dict):
                self._keys(name)
                continue
            try:
                crc = file_crc32(os.path.join(self.directory, name))
            except OSError as e:
                raise CheckpointError(f"{self.origin}/{name} is unreadable: {e}") from None
            if crc != entry["crc32"]:
                raise CheckpointError(f"{self.origin}/{name} has CRC-32 {crc:08x}, committed as "
                                      f"{entry['crc32']:08x}: its bytes changed after it was written")

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

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose key starts with `prefix/`, by the rest of its key."""
        keys = [k for k in self.where if k.startswith(prefix + "/")]
        out: dict[str, torch.Tensor] = {}
        for file in sorted({self.where[k] for k in keys}):
            with safe_open(os.path.join(self.directory, file), "pt") as f:
                for key in keys:
                    if self.where[key] == file:
                        out[key[len(prefix) + 1:]] = f.get_tensor(key)
        return out

    def hook_tensors(self, hook: str) -> dict[str, torch.Tensor]:
        return self.tensors(f"hook/{hook}")


def load_weights(model: torch.nn.Module, directory: str) -> None:
    """A checkpoint's parameters into a model built in full (export, evaluation), whatever wrote them."""
    model.load_state_dict(Reader(directory).tensors("param"), strict=True)
