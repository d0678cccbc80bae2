"""Export a checkpoint through its task (Hugging Face folders for text and MAE), from a local or s3:// run."""
from __future__ import annotations

import tempfile

from raypt import checkpoint, storage
from raypt.config import ConfigError, JobConfig
from raypt.data.manifest import read_manifest
from raypt.tasks import by_modality, get_task


def export(checkpoint_dir: str, cfg: JobConfig, out_dir: str) -> str:
    checkpoint.read_state(checkpoint_dir)  # refuse a torn checkpoint
    manifests = by_modality([read_manifest(s.path) for s in cfg.data.mix()])
    task = get_task(cfg.model.task)(cfg, manifests)
    model = task.build_model(cfg.run.seed)
    checkpoint.load_weights(model, checkpoint_dir)
    task.export(model, out_dir)
    return out_dir


def export_run(cfg: JobConfig, out: str) -> tuple[str, str]:
    """Export the run's newest good checkpoint (local or s3://) to `out` (local or s3://); (its name, out)."""
    folder = storage.join(cfg.run.storage, cfg.run.name)
    for uri in reversed(checkpoint.list_checkpoints(folder)):
        try:
            checkpoint.read_state(uri)  # a torn checkpoint is skipped before it is downloaded
            with checkpoint.local_copy(uri) as local, tempfile.TemporaryDirectory(prefix="raypt-export-") as tmp:
                export(local, cfg, out if "://" not in out else tmp)
                if "://" in out:
                    storage.copy_tree(tmp, out)
        except checkpoint.CheckpointError:
            continue
        return uri.rsplit("/", 1)[-1], out
    raise ConfigError(f"run.name: run '{cfg.run.name}' has no committed checkpoint under {folder}")
