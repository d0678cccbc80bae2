"""The MAE and multimodal jobs of jobs/ train on 2 workers of the shared local Ray cluster and their losses fall."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from raypt import config
from raypt.data.prepare import prepare
from raypt.data.stream import SOURCE_BITS
from raypt.driver import train
from raypt.metrics.sink import read_metrics

JOBS = os.path.join(os.path.dirname(__file__), "..", "jobs")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    """Real images (scikit-image's) and sounds (Python's own test recordings), prepared once."""
    import skimage.data

    root = tmp_path_factory.mktemp("media")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    folder = os.path.dirname(skimage.data.__file__)
    images = f"data.prepare.inputs=[{folder}/*.png, {folder}/*.jpg, {root / 'corrupt.png'}]"
    paths = {}
    for name, source in (("images", "images"), ("sounds", "stdlib-audio")):
        cfg = config.load(None, [f"data.prepare.source={source}", "data.prepare.val_fraction=0.15",
                                 "data.prepare.rows_per_group=8", "data.max_bad_fraction=0.1",
                                 *([images] if name == "images" else [])], check_data=False)
        paths[name] = str(root / name)
        prepare(paths[name], cfg.data.prepare, cfg.data)
    return paths


def losses(folder: str) -> tuple[list[float], list[float]]:
    records = read_metrics(folder)
    return ([r["loss"] for r in records if r.get("loss") is not None],
            [r["val_loss"] for r in records if r.get("val_loss") is not None])


def test_mae_job_trains_and_exports_for_transformers(ray_cluster, media, tmp_path):
    from transformers import AutoImageProcessor, ViTMAEForPreTraining

    cfg = config.load(os.path.join(JOBS, "mae.yaml"), [
        f"data.path={media['images']}", f"run.storage={tmp_path}", "model.hidden_size=48", "model.num_layers=2",
        "model.decoder_hidden_size=32", "model.decoder_layers=1", "train.steps=40", "train.global_batch=16",
        "train.micro_batch=8", "train.eval_every=40", "checkpoint.every=40"])
    folder = train(cfg)
    train_loss, val_loss = losses(folder)
    assert np.mean(train_loss[-5:]) < 0.9 * np.mean(train_loss[:5]), train_loss
    assert val_loss[-1] < val_loss[0]
    skipped = json.load(open(os.path.join(folder, "summary.json")))["bad_records"]["main"]
    assert skipped["count"] == 1 and skipped["records"][0]["name"].endswith("corrupt.png")
    assert read_metrics(folder)[0]["bad_records"] == {"main": 1}
    model = ViTMAEForPreTraining.from_pretrained(os.path.join(folder, "export"))
    assert model.config.mask_ratio == 0.75 and model.config.image_size == 32
    assert AutoImageProcessor.from_pretrained(os.path.join(folder, "export")).size["height"] == 32


def test_multimodal_job_mixes_text_images_and_sound_under_zero3(ray_cluster, tiny_data, media, tmp_path):
    sources = (f"data.sources=[{{name: code, path: {tiny_data}, weight: 2}}, "
               f"{{name: images, path: {media['images']}, weight: 1}}, "
               f"{{name: sounds, path: {media['sounds']}, weight: 1}}]")
    cfg = config.load(os.path.join(JOBS, "multimodal.yaml"), [
        sources, f"run.storage={tmp_path}", "model.hidden_size=48", "model.num_layers=2", "model.num_heads=2",
        "train.steps=40", "train.global_batch=8", "train.micro_batch=2", "train.eval_every=40",
        "checkpoint.every=40", "run.log_sample_ids=true"])
    assert cfg.deepspeed.zero_stage == 3
    folder = train(cfg)
    train_loss, val_loss = losses(folder)
    assert np.mean(train_loss[-5:]) < 0.9 * np.mean(train_loss[:5]), train_loss
    assert val_loss[-1] < val_loss[0]
    for r in read_metrics(folder):
        if "sample_ids" in r:  # 4 code, 2 image and 2 sound samples in every global batch of 8
            assert np.bincount(np.array(r["sample_ids"]) >> SOURCE_BITS).tolist() == [4, 2, 2], r["step"]
