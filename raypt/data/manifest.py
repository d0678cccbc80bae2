"""The manifest names every shard, its row groups and checksum: the single source of a dataset's order."""
from __future__ import annotations

from raypt import storage

MANIFEST = "manifest.json"


def read_manifest(root: str) -> dict:
    manifest = storage.read_json(storage.join(root, MANIFEST))
    manifest["root"] = root
    return manifest


def shard_uri(manifest: dict, file_entry: dict) -> str:
    return storage.join(manifest["root"], file_entry["path"])


def modality(manifest: dict) -> str:
    """Token datasets written before modalities existed carry none: they are text."""
    return manifest.get("modality", "text")


def bad_records(names: list[str], manifests: list[dict], detail: bool = False) -> dict:
    """What `data prepare` left out of each source, as `{"bad_records": {source: count}}` (with `detail`: the
    manifest's whole entry, reasons included), or {} when nothing was skipped."""
    skipped = {n: m.get("bad_records", {}) for n, m in zip(names, manifests) if m.get("bad_records", {}).get("count")}
    return {"bad_records": {n: v if detail else v["count"] for n, v in skipped.items()}} if skipped else {}
