"""How stored samples become model inputs: image crops and augmentations, audio clips and log-mel features.

The settings live here, light (pydantic only), rather than in raypt.config: tasks size their models from them,
and config imports the task registry, so tasks cannot import config.
"""
from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from raypt.schema import Section

BATCH_KEY = {"text": "input_ids", "image": "pixel_values", "audio": "audio_features"}  # each modality's batch key

Share = Annotated[float, Field(gt=0, le=1)]
Mean = Annotated[float, Field(ge=0, le=1)]
Chance = Annotated[float, Field(ge=0, le=1)]
Sigma = Annotated[float, Field(gt=0)]
# The augmentation types, in the fixed order a training view goes through them (SimCLR's).
Augment = Literal["crop", "flip", "jitter", "grayscale", "blur"]
AUGMENTS: tuple[str, ...] = get_args(Augment)
# data.image.flip was a switch before it was a probability; configs saved then (run folders, sweeps' best.yaml)
# still load: true was a mirror half of the time, false never.
FlipChance = Annotated[Chance, BeforeValidator(lambda v: (0.5 if v else 0.0) if isinstance(v, bool) else v)]


class ImageConfig(Section):
    """Image decoding and training augmentations (done in the feed's read tasks, seeded by each sample's place in
    the global order, so a resumed run repeats them exactly); evaluation fits the whole image, unaugmented."""
    size: int = Field(32, ge=8, description="side in pixels of the square crops fed to the model")
    augment: list[Augment] = Field(
        ["crop", "flip", "jitter"], description="the augmentation types of training views, applied in this fixed "
        "order whatever the list's: crop (random-resized crop), flip (left-right), jitter (colour: brightness, "
        "contrast, saturation), grayscale (colour drop), blur (Gaussian); each type's strength is its own field. "
        "Without crop a view is the whole image fitted as in evaluation; [] = no augmentation")
    crop_scale: tuple[Share, Share] = Field(
        (0.35, 1.0), description="crop: (low, high): training crops cover a random share of the image's area in "
        "this range (a random-resized crop, aspect ratio 3/4 to 4/3; SimCLR: (0.08, 1)); (1, 1) = whole-image "
        "crops")
    flip: FlipChance = Field(0.5, description="flip: probability that a view is mirrored left-right (true and "
                             "false, the older form, mean 0.5 and 0)")
    jitter: float = Field(0.4, ge=0, le=1, description="jitter: a view's brightness, contrast and saturation are "
                          "each scaled by a random factor in [1 - jitter, 1 + jitter] (hue is left alone); 0 = off")
    jitter_p: Chance = Field(1.0, description="jitter: probability that a view is jittered (SimCLR: 0.8)")
    grayscale_p: Chance = Field(0.2, description="grayscale: probability that a view loses its colour (its luma "
                              "copied to all three channels), SimCLR's colour drop")
    blur_p: Chance = Field(0.5, description="blur: probability that a view is blurred")
    blur_sigma: tuple[Sigma, Sigma] = Field(
        (0.1, 2.0), description="blur: (low, high) pixels: the Gaussian's standard deviation is drawn uniformly in "
        "this range; as in SimCLR the kernel spans 10% of the view's side (odd, at least 3 px: 3 px at 32 px), "
        "which bounds how far a large sigma blurs")
    views: Literal[1, 2] = Field(1, description="augmented views per image (2 for contrastive tasks; MAE and "
                                 "multimodal learn from the first)")
    mean: tuple[Mean, Mean, Mean] = Field((0.485, 0.456, 0.406), description="per-channel (RGB) mean subtracted "
                                          "from pixels scaled to [0, 1]")
    std: tuple[Share, Share, Share] = Field((0.229, 0.224, 0.225), description="per-channel (RGB) standard "
                                            "deviation the centred pixels are divided by")

    @field_validator("augment")
    @classmethod
    def _in_order(cls, kinds: list[str]) -> list[str]:
        """Listed once each, in the order they are applied, so a saved config reads as what a view went through."""
        return [kind for kind in AUGMENTS if kind in kinds]

    @field_validator("crop_scale", "blur_sigma")
    @classmethod
    def _ordered(cls, bounds: tuple[float, float], info: ValidationInfo) -> tuple[float, float]:
        if bounds[0] > bounds[1]:
            raise ValueError(f"data.image.{info.field_name}: got {list(bounds)}; need low <= high")
        return bounds


class AudioConfig(Section):
    """Audio decoding: mono, resampled, cut or padded to a fixed clip, then a log-mel spectrogram (Whisper's
    scaling), so every clip gives the same number of frames."""
    sample_rate: int = Field(16000, ge=1000, description="Hz; recordings at other rates are resampled to it")
    seconds: float = Field(1.0, gt=0, description="clip length in seconds: longer audio is cut (at a random "
                           "offset in training, from the start in evaluation), shorter audio zero-padded")
    n_mels: int = Field(40, ge=8, description="mel bands per frame")
    n_fft: int = Field(400, ge=16, description="FFT window length in samples")
    hop: int = Field(160, ge=1, description="samples between frames")

    @model_validator(mode="after")
    def _has_frames(self) -> "AudioConfig":
        if round(self.seconds * self.sample_rate) < self.hop:
            raise ValueError(f"data.audio.seconds: {self.seconds} s at {self.sample_rate} Hz is shorter than one "
                             f"hop ({self.hop} samples): clips would have no frame")
        return self
