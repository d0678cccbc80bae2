"""Where checkpoints live: finding the newest good one, pruning, background uploads, local copies.

raypt's index file, not Ray's checkpoint registry, decides what is resumable: Ray's keep-K cannot know which
checkpoints verify, and it refuses to resume a run whose registered checkpoints were pruned.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import pyarrow.fs as pafs

from raypt import storage
from raypt.checkpoint.index import STATE, CheckpointError, read_state


def list_checkpoints(run_uri: str) -> list[str]:
    """Checkpoint folders of a run, oldest first."""
    fs, path = storage.resolve(run_uri)
    selector = pafs.FileSelector(path, allow_not_found=True)
    steps = sorted(i.base_name for i in fs.get_file_info(selector)
                   if i.type == pafs.FileType.Directory and re.fullmatch(r"step\d+", i.base_name))
    return [storage.join(run_uri, s) for s in steps]


def latest_good(run_uri: str, log: Callable[[str], None] = print) -> Optional[str]:
    """The newest checkpoint that verifies; each one skipped is logged with the reason."""
    for uri in reversed(list_checkpoints(run_uri)):
        try:
            read_state(uri)
            return uri
        except CheckpointError as e:
            log(f"skipping checkpoint: {e}; falling back to the previous one")
    return None


def prune(run_uri: str, keep: int, log: Callable[[str], None] = print) -> None:
    """Keep the newest `keep` good checkpoints and whatever is newer (uploads may be in flight); never the only
    good one is deleted, because deletion only reaches below the oldest kept good checkpoint."""
    folders = list_checkpoints(run_uri)
    good = []
    for uri in reversed(folders):
        try:
            read_state(uri)
            good.append(uri)
        except CheckpointError:
            pass
        if len(good) == keep:
            break
    if len(good) < keep:
        return
    fs, _ = storage.resolve(run_uri)
    for uri in folders[:folders.index(good[-1])]:
        fs.delete_dir(storage.resolve(uri)[1])
        log(f"deleted old checkpoint {uri.rsplit('/', 1)[-1]}")


class Uploader:
    """Moves a rank's checkpoint part into the run's storage on one background thread, so training goes on.
    `committed`: the last checkpoint whose upload finished here (on rank 0, whose index lands last: the last
    committed checkpoint of the run)."""

    def __init__(self, run_uri: str, keep: int, prunes: bool):
        self.run_uri, self.keep, self.prunes = run_uri, keep, prunes
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raypt-upload")
        self.pending: Optional[Future] = None
        self.committed: Optional[str] = None

    def submit(self, local: str, step: int) -> None:
        self.wait()  # one upload in flight: checkpoints land in step order
        self.pending = self.pool.submit(self._upload, local, step)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def _upload(self, local: str, step: int) -> None:
        uri = storage.join(self.run_uri, f"step{step:06d}")
        fs, path = storage.resolve(uri)
        fs.create_dir(path, recursive=True)
        for name in sorted(os.listdir(local), key=lambda n: n == STATE):  # the state file lands last
            storage.copy_tree(os.path.join(local, name), storage.join(uri, name))
        shutil.rmtree(local, ignore_errors=True)
        self.committed = uri
        if self.prunes:
            prune(self.run_uri, self.keep, log=lambda m: None)


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local folder holding the checkpoint: the folder itself when local, a downloaded copy otherwise."""
    fs, path = storage.resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="raypt-restore-") as tmp:
        storage.copy_tree(uri, tmp)
        yield tmp
