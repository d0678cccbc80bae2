"""One way to reach a path, local or s3://, so every module reads and writes storage the same way."""
from __future__ import annotations

import json
import os

import pyarrow.fs as pafs


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it; s3:// honours the standard AWS environment."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_json(uri: str) -> dict:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError) as e:
        if isinstance(e, FileNotFoundError) or "not found" in str(e).lower() or "does not exist" in str(e).lower():
            raise FileNotFoundError(uri) from None
        raise


def write_json(uri: str, obj: dict) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(json.dumps(obj, indent=2).encode())
