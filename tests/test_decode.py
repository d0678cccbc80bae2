"""Decoding turns stored bytes into fixed-shape arrays, deterministically given the caller's Generator."""
from __future__ import annotations

import io
import os
from types import SimpleNamespace

import numpy as np
import pytest
import skimage.data
import soundfile as sf
import torch
from PIL import Image
from transformers.audio_utils import hertz_to_mel, mel_to_hertz

from raypt import config
from raypt.data.decode import (BadRecord, audio_features, audio_frames, decode_audio, decode_image, image_views,
                               patchify)
from raypt.data.features import AUGMENTS, ImageConfig

SKIMAGE = os.path.dirname(skimage.data.__file__)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def image_cfg(views: int = 2, **over) -> ImageConfig:
    """A validated config; `views` is set past validation, since decoding takes any number (the config 1 or 2)."""
    return ImageConfig(**{"size": 32, "mean": MEAN, "std": STD, **over}).model_copy(update={"views": views})


def audio_cfg(**over) -> SimpleNamespace:
    return SimpleNamespace(**{"sample_rate": 16000, "seconds": 1.0, "n_mels": 40, "n_fft": 400, "hop": 160, **over})


def stored(name: str) -> bytes:
    with open(os.path.join(SKIMAGE, name), "rb") as f:
        return f.read()


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def pixels(views: np.ndarray) -> np.ndarray:
    """Undo normalisation: [views, 3, H, W] -> [views, H, W, 3] in 0..255."""
    return (views.transpose(0, 2, 3, 1) * np.array(STD) + np.array(MEAN)) * 255


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("name", ["astronaut.png", "chelsea.png", "rocket.jpg"])
def test_image_views_shape_and_dtype(name, views):
    for r in (rng(0), None):
        out = image_views(stored(name), image_cfg(views=views), r)
        assert out.shape == (views, 3, 32, 32)
        assert out.dtype == np.float32
        assert np.isfinite(out).all()


@pytest.mark.parametrize("name", ["coffee.png", "chelsea.png", "rocket.jpg"])
def test_augmentation_is_a_function_of_the_seed(name):
    data, cfg = stored(name), image_cfg()
    first = image_views(data, cfg, rng(7))
    assert np.array_equal(first, image_views(data, cfg, rng(7)))
    assert not np.array_equal(first, image_views(data, cfg, rng(8)))
    assert not np.array_equal(first[0], first[1])  # the two training views are augmented independently


def test_augmentation_without_jitter_or_flip_still_crops_randomly():
    data, cfg = stored("astronaut.png"), image_cfg(jitter=0.0, flip=False, views=4)
    views = image_views(data, cfg, rng(1))
    assert len({v.tobytes() for v in views}) == 4


def test_eval_of_a_square_image_is_the_whole_image_resized():
    data = stored("astronaut.png")
    out = image_views(data, image_cfg(), None)
    assert np.array_equal(out, image_views(data, image_cfg(), None))
    expected = np.asarray(decode_image(data).resize((32, 32), Image.Resampling.BICUBIC), dtype=np.float64)
    np.testing.assert_allclose(pixels(out), np.stack([expected, expected]), atol=1e-3)


@pytest.mark.parametrize("size", [(96, 48), (48, 96)])
def test_eval_crops_the_centre(size):
    """A blue centre square between red margins: the evaluation crop keeps only the blue."""
    image = Image.new("RGB", size, (255, 0, 0))
    side = min(size)
    image.paste((0, 0, 255), ((size[0] - side) // 2, (size[1] - side) // 2,
                              (size[0] + side) // 2, (size[1] + side) // 2))
    out = pixels(image_views(encode(image), image_cfg(size=16, views=1), None))[0]
    assert out[2:-2, 2:-2, 0].max() < 1 and out[2:-2, 2:-2, 2].min() > 254
    assert out[..., 0].mean() < 10  # at most a thin bicubic fringe of red at the borders


def test_crop_falls_back_to_the_centre_when_no_random_box_fits():
    """A 200x10 strip fits no box of the sampled area and aspect ratio; the fallback is its centre 13x10."""
    image = Image.new("RGB", (200, 10), (255, 0, 0))
    image.paste((0, 0, 255), (90, 0, 110, 10))
    out = pixels(image_views(encode(image), image_cfg(size=16, jitter=0.0, flip=False), rng(0)))
    assert out[..., 0].max() < 1 and out[..., 2].min() > 254


@pytest.mark.parametrize("r", [None, 3])
def test_solid_colour_maps_to_normalised_constant(r):
    colour = np.array([200, 100, 50])
    data = encode(Image.new("RGB", (40, 60), tuple(colour)))
    out = image_views(data, image_cfg(jitter=0.0), None if r is None else rng(r))
    expected = (colour / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(out, np.broadcast_to(expected[None, :, None, None], out.shape), atol=1e-5)


def test_jitter_changes_a_solid_colour():
    data = encode(Image.new("RGB", (40, 60), (200, 100, 50)))
    out = pixels(image_views(data, image_cfg(jitter=0.5), rng(0)))
    assert not np.allclose(out, np.array([200, 100, 50]), atol=1)


def test_grayscale_and_rgba_become_rgb():
    gray = stored("camera.png")
    assert Image.open(io.BytesIO(gray)).mode == "L"
    assert decode_image(gray).mode == "RGB"
    out = pixels(image_views(gray, image_cfg(views=1), None))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)
    rgba = encode(Image.new("RGBA", (20, 20), (10, 20, 30, 128)))
    assert decode_image(rgba).mode == "RGB"
    assert image_views(rgba, image_cfg(), rng(0)).shape == (2, 3, 32, 32)


# Each type on for certain (blur at a sigma that always shows), and that type off by its own strength field.
CERTAIN = {"flip": 1.0, "jitter_p": 1.0, "grayscale_p": 1.0, "blur_p": 1.0, "blur_sigma": (1.0, 2.0)}
ZERO = {"flip": {"flip": 0.0}, "jitter": {"jitter": 0.0}, "grayscale": {"grayscale_p": 0.0}, "blur": {"blur_p": 0.0}}


def high_frequency_energy(views: np.ndarray) -> float:
    """Mean squared difference of neighbouring pixels, across rows and columns."""
    x = pixels(views)
    return float((np.diff(x, axis=1) ** 2).mean() + (np.diff(x, axis=2) ** 2).mean())


@pytest.mark.parametrize("kind", AUGMENTS)
def test_each_augmentation_type_changes_the_view_when_on_and_not_when_off(kind):
    data = stored("chelsea.png")  # a colour photo, wider than tall
    whole = image_views(data, image_cfg(), None)
    off = image_views(data, image_cfg(augment=[], **CERTAIN), rng(0))
    assert np.array_equal(off, whole)  # nothing listed: the evaluation view, whatever the strengths
    on = image_views(data, image_cfg(augment=[kind], **CERTAIN), rng(0))
    assert not np.allclose(on, whole, atol=1e-3)
    if kind in ZERO:
        zero = image_views(data, image_cfg(augment=[kind], **{**CERTAIN, **ZERO[kind]}), rng(0))
        assert np.array_equal(zero, whole)


def test_flip_mirrors_the_whole_view():
    data = stored("chelsea.png")
    on = image_views(data, image_cfg(augment=["flip"], flip=1.0), rng(0))
    assert np.array_equal(on, image_views(data, image_cfg(), None)[..., ::-1])


def test_grayscale_views_have_equal_channels():
    data = stored("chelsea.png")
    out = pixels(image_views(data, image_cfg(augment=["crop", "jitter", "grayscale"], grayscale_p=1.0), rng(3)))
    np.testing.assert_allclose(out[..., 0], out[..., 1], atol=1e-3)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-3)
    colour = pixels(image_views(data, image_cfg(augment=["crop", "jitter"]), rng(3)))
    assert np.abs(colour[..., 0] - colour[..., 2]).max() > 50


@pytest.mark.parametrize("seed", range(4))
def test_blur_lowers_the_high_frequency_energy(seed):
    data = stored("astronaut.png")
    sharp = image_views(data, image_cfg(augment=["crop"]), rng(seed))
    blurred = image_views(data, image_cfg(augment=["crop", "blur"], blur_p=1.0, blur_sigma=(1.0, 2.0)), rng(seed))
    assert high_frequency_energy(blurred) < 0.7 * high_frequency_energy(sharp)


def test_blur_kernel_spans_a_tenth_of_the_side_as_in_simclr():
    """A lone white pixel blurred at sigma 2: at 32 px the kernel is 3 px wide, at 64 px 7 px."""
    for side, width in ((32, 3), (64, 7)):
        dot = Image.new("RGB", (side, side))
        dot.putpixel((side // 2, side // 2), (255, 255, 255))
        cfg = image_cfg(size=side, views=1, augment=["blur"], blur_p=1.0, blur_sigma=(2.0, 2.0))
        lit = pixels(image_views(encode(dot), cfg, rng(0)))[0, ..., 0] > 0.5
        rows, cols = np.nonzero(lit)
        assert rows.max() - rows.min() + 1 == cols.max() - cols.min() + 1 == width


def test_all_five_types_are_a_function_of_the_seed():
    data, cfg = stored("coffee.png"), image_cfg(augment=list(AUGMENTS), views=2)
    first = image_views(data, cfg, rng(11))
    assert np.array_equal(first, image_views(data, cfg, rng(11)))
    assert not np.array_equal(first, image_views(data, cfg, rng(12)))
    assert not np.array_equal(first[0], first[1])


def test_augment_is_applied_in_a_fixed_order_and_old_flip_switches_still_load():
    assert image_cfg(augment=["blur", "crop", "grayscale", "blur"]).augment == ["crop", "grayscale", "blur"]
    assert image_cfg(flip=True).flip == 0.5 and image_cfg(flip=False).flip == 0.0  # configs saved before
    assert ImageConfig().augment == ["crop", "flip", "jitter"]


@pytest.mark.parametrize("override, expected", [
    ("data.image.augment=[crop, sharpen]", "data.image.augment.1: got 'sharpen'; Input should be 'crop', 'flip', "
                                           "'jitter', 'grayscale' or 'blur'"),
    ("data.image.blur_sigma=[2, 1]", "data.image.blur_sigma: got [2.0, 1.0]; need low <= high"),
    ("data.image.grayscale_p=1.5", "data.image.grayscale_p: got 1.5"),
])
def test_bad_augmentation_settings_are_refused_naming_the_field_and_what_is_allowed(override, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("data", [b"", b"definitely not an image", b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
                                  stored("rocket.jpg")[:5000], stored("coffee.png")[:-2000]],
                         ids=["empty", "garbage", "png-header-garbage", "truncated-jpeg", "truncated-png"])
def test_undecodable_images_are_bad_records(data):
    with pytest.raises(BadRecord, match="undecodable image"):
        decode_image(data)
    with pytest.raises(BadRecord):
        image_views(data, image_cfg(), rng(0))


def test_patchify_layout():
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    out = patchify(x, 8)
    assert isinstance(out, np.ndarray) and out.shape == (2, 16, 8 * 8 * 3)
    assert np.array_equal(out[:, 0], x[:, :, :8, :8].transpose(0, 2, 3, 1).reshape(2, -1))  # top-left, (p, p, c)
    assert np.array_equal(out[:, 1], x[:, :, :8, 8:16].transpose(0, 2, 3, 1).reshape(2, -1))  # then rightwards
    assert np.array_equal(out[:, 4], x[:, :, 8:16, :8].transpose(0, 2, 3, 1).reshape(2, -1))  # then down


def test_patchify_matches_vitmae_and_keeps_leading_dims():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(image_size=16, patch_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=8, decoder_hidden_size=8, decoder_num_hidden_layers=1,
                          decoder_num_attention_heads=2, decoder_intermediate_size=8)
    x = torch.randn(2, 5, 3, 16, 16)
    out = patchify(x, 4)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5, 16, 48)
    reference = ViTMAEForPreTraining(config).patchify(x.reshape(10, 3, 16, 16))
    assert torch.equal(out.reshape(10, 16, 48), reference)
    with pytest.raises(ValueError):
        patchify(x, 5)


def tone(rate: int, seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write(path, samples: np.ndarray, rate: int, **kw) -> bytes:
    sf.write(str(path), samples, rate, **kw)
    return path.read_bytes()


def nearest_mel_bin(cfg, hz: float) -> int:
    edges = np.linspace(hertz_to_mel(0.0, "slaney"), hertz_to_mel(cfg.sample_rate / 2, "slaney"), cfg.n_mels + 2)
    return int(np.argmin(np.abs(mel_to_hertz(edges[1:-1], "slaney") - hz)))


@pytest.mark.parametrize("rate,name", [(8000, "tone.wav"), (44100, "tone.flac")])
def test_tone_lands_in_the_right_mel_bin_after_resampling(tmp_path, rate, name):
    cfg = audio_cfg()
    data = write(tmp_path / name, tone(rate, 1.5), rate)
    assert decode_audio(data)[1] == rate
    out = audio_features(data, cfg, rng(0))
    assert out.shape == (cfg.n_mels, audio_frames(cfg)) == (40, 100)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    assert int(np.argmax(out.mean(axis=1))) == nearest_mel_bin(cfg, 1000.0) != nearest_mel_bin(cfg, 2000.0)


def test_random_clip_is_a_function_of_the_seed(tmp_path):
    cfg = audio_cfg()
    samples = (0.3 * np.random.default_rng(0).standard_normal(16000 * 3)).astype(np.float32)
    data = write(tmp_path / "noise.wav", samples, 16000, subtype="FLOAT")
    first = audio_features(data, cfg, rng(5))
    assert np.array_equal(first, audio_features(data, cfg, rng(5)))
    assert not np.array_equal(first, audio_features(data, cfg, rng(6)))
    start = write(tmp_path / "start.wav", samples[:16000], 16000, subtype="FLOAT")
    assert np.array_equal(audio_features(data, cfg, None), audio_features(start, cfg, None))  # eval: offset 0


def test_short_clip_is_zero_padded(tmp_path):
    cfg = audio_cfg()
    out = audio_features(write(tmp_path / "short.wav", tone(16000, 0.3), 16000), cfg, rng(0))
    assert out.shape == (40, audio_frames(cfg))
    assert np.all(out[:, 40:] == out.min())  # silence sits at the floor
    assert out[:, :25].max(axis=0).min() > out.min() + 1


def test_frames_follow_the_config():
    assert audio_frames(audio_cfg(seconds=2.0, hop=320)) == 100
    assert audio_frames(audio_cfg(sample_rate=8000, seconds=0.5)) == 25


def test_undecodable_audio_is_a_bad_record(tmp_path):
    empty_wav = write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    for data in (b"", b"RIFF garbage that is not audio" * 10, empty_wav):
        with pytest.raises(BadRecord, match="audio"):
            audio_features(data, audio_cfg(), rng(0))


def test_stereo_is_averaged_to_mono(tmp_path):
    left, right = tone(22050, 0.5), tone(22050, 0.5, hz=3000) * 0.5
    samples, rate = decode_audio(write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), 22050,
                                       subtype="FLOAT"))
    assert rate == 22050 and samples.dtype == np.float32 and samples.shape == left.shape
    np.testing.assert_allclose(samples, (left + right) / 2, atol=1e-7)
