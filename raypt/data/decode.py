"""Decode stored, still-encoded samples into training arrays inside the data feed's window tasks.

Every random choice is drawn from an explicit numpy Generator that the caller seeds from (seed, global sample
position), so a resumed run reproduces the exact augmentations; `rng=None` means evaluation: no randomness at all.
"""
from __future__ import annotations

import functools
import io
import math
import re
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

# SciPy, soundfile and transformers' audio helpers are imported where they are used: every training worker
# imports this module, and a text job would pay about a second per process for them.

RESAMPLE = Image.Resampling.BICUBIC
RATIO = (math.log(3 / 4), math.log(4 / 3))  # RandomResizedCrop's aspect-ratio range, sampled log-uniformly
ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


class BadRecord(ValueError):
    """A sample that cannot be decoded; the message names what was wrong."""


def _reason(err: BaseException) -> str:
    """The decoder's message without object addresses (PIL names its buffer `<... object at 0x7f...>`), so a
    manifest that lists it is the same bytes at every preparation."""
    return re.sub(r" at 0x[0-9a-fA-F]+>", ">", str(err))


def decode_image(data: bytes) -> Image.Image:
    """RGB whatever the stored mode; convert() decodes every pixel, so truncation surfaces here, not later."""
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as err:
        raise BadRecord(f"undecodable image ({len(data)} bytes): {_reason(err)}") from err


def _crop_box(width: int, height: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, ...]:
    """RandomResizedCrop's box, as torchvision samples it: ten tries, then a centre crop of clamped aspect ratio."""
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        ratio = math.exp(rng.uniform(*RATIO))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    ratio = min(max(width / height, 3 / 4), 4 / 3)
    w, h = (width, round(width / ratio)) if width / height < ratio else (round(height * ratio), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _chance(rng: np.random.Generator, p: float) -> bool:
    """A coin of probability p. A certain or impossible event draws nothing: views of the default settings (flip
    0.5, jitter_p 1) take the draws they took before types were selectable, so older runs go on with the same views."""
    return p >= 1 or (p > 0 and rng.random() < p)


def _blur(view: Image.Image, sigma: float) -> Image.Image:
    """Gaussian blur as SimCLR's (torchvision's GaussianBlur): a kernel of 10% of the side, odd and at least 3 px,
    normalised after truncation, edges mirrored."""
    from scipy.ndimage import gaussian_filter

    radius = max(1, int(0.1 * view.width) // 2)
    blurred = gaussian_filter(np.asarray(view, dtype=np.float32), sigma=(sigma, sigma, 0), mode="mirror",
                              radius=(radius, radius, 0))
    return Image.fromarray(np.clip(np.rint(blurred), 0, 255).astype(np.uint8))


def _whole(image: Image.Image, size: int) -> Image.Image:
    """The evaluation view: the largest centred square, resized."""
    return ImageOps.fit(image, (size, size), RESAMPLE)


def _augment(image: Image.Image, cfg: Any, rng: np.random.Generator) -> Image.Image:
    """One training view: the types in cfg.augment, always in SimCLR's order (crop, flip, jitter, grayscale, blur)
    whatever the list's, each with its own draws from rng; blur comes last so its kernel is sized to the view."""
    kinds = set(cfg.augment)
    if "crop" in kinds:
        view = image.resize((cfg.size, cfg.size), RESAMPLE, box=_crop_box(*image.size, tuple(cfg.crop_scale), rng))
    else:
        view = _whole(image, cfg.size)
    if "flip" in kinds and _chance(rng, cfg.flip):
        view = ImageOps.mirror(view)
    if "jitter" in kinds and cfg.jitter > 0 and _chance(rng, cfg.jitter_p):
        for enhancer, factor in zip(ENHANCERS, rng.uniform(1 - cfg.jitter, 1 + cfg.jitter, len(ENHANCERS))):
            view = enhancer(view).enhance(float(factor))
    if "grayscale" in kinds and _chance(rng, cfg.grayscale_p):
        view = view.convert("L").convert("RGB")  # ITU-R 601 luma, as torchvision's Grayscale
    if "blur" in kinds and _chance(rng, cfg.blur_p):
        view = _blur(view, float(rng.uniform(*cfg.blur_sigma)))
    return view


def image_views(data: bytes, cfg: Any, rng: np.random.Generator | None) -> np.ndarray:
    """float32 [views, 3, size, size], pixels scaled to [0, 1] then normalised by cfg.mean/std.

    With rng, each view is augmented independently; without (evaluation), one centre crop is repeated.
    """
    image = decode_image(data)
    if rng is None:
        views = [_whole(image, cfg.size)] * cfg.views
    else:
        views = [_augment(image, cfg, rng) for _ in range(cfg.views)]
    pixels = np.stack([np.asarray(view, dtype=np.float32) for view in views]) / 255.0
    normalised = (pixels - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2))


def patchify(images: np.ndarray | torch.Tensor, patch: int) -> np.ndarray | torch.Tensor:
    """[..., C, H, W] -> [..., (H/p)*(W/p), p*p*C] in ViTMAE's layout, so its loss and decoders line up.

    numpy in gives numpy out.
    """
    x = torch.as_tensor(images)
    *lead, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible into {patch}x{patch} patches")
    x = x.reshape(*lead, c, h // patch, patch, w // patch, patch)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)  # (..., rows, cols, p, p, c)
    out = x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)
    return out.numpy() if isinstance(images, np.ndarray) else out


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples (channels averaged) and the file's own sample rate."""
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, TypeError, ValueError) as err:
        raise BadRecord(f"undecodable audio ({len(data)} bytes): {_reason(err)}") from err
    if samples.size == 0:
        raise BadRecord(f"audio has no samples ({len(data)} bytes)")
    return samples.mean(axis=1), rate


def audio_frames(cfg: Any) -> int:
    """Frames per clip, fixed by the config, so models can size themselves without decoding anything."""
    return round(cfg.seconds * cfg.sample_rate) // cfg.hop


@functools.lru_cache(maxsize=8)
def _filters(sample_rate: int, n_fft: int, n_mels: int) -> tuple[np.ndarray, np.ndarray]:
    """Hann window and Slaney mel filters (Whisper's), built once per worker per configuration."""
    from transformers.audio_utils import mel_filter_bank, window_function

    mel = mel_filter_bank(num_frequency_bins=1 + n_fft // 2, num_mel_filters=n_mels, min_frequency=0.0,
                          max_frequency=sample_rate / 2, sampling_rate=sample_rate, norm="slaney", mel_scale="slaney")
    return window_function(n_fft, "hann"), mel


def audio_features(data: bytes, cfg: Any, rng: np.random.Generator | None) -> np.ndarray:
    """float32 [n_mels, audio_frames(cfg)] log-mel spectrogram of a fixed-length clip, scaled as Whisper does.

    With rng, a longer recording is clipped at a random offset; without (evaluation), from its start.
    """
    from scipy.signal import resample_poly
    from transformers.audio_utils import spectrogram

    samples, rate = decode_audio(data)
    if rate != cfg.sample_rate:
        g = math.gcd(cfg.sample_rate, rate)
        samples = resample_poly(samples, cfg.sample_rate // g, rate // g)
    length = round(cfg.seconds * cfg.sample_rate)
    start = int(rng.integers(0, len(samples) - length + 1)) if rng is not None and len(samples) > length else 0
    clip = np.pad(samples[start:start + length], (0, max(0, length - len(samples))))
    window, mel = _filters(cfg.sample_rate, cfg.n_fft, cfg.n_mels)
    log_mel = spectrogram(clip, window, frame_length=cfg.n_fft, hop_length=cfg.hop, power=2.0, mel_filters=mel,
                          log_mel="log10")[:, :audio_frames(cfg)]
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)  # Whisper's floor: at most 8 decades below the peak
    return ((log_mel + 4.0) / 4.0).astype(np.float32)
