"""How stored samples become model inputs: image crops and augmentations, audio clips and log-mel features.

The settings live here, light (pydantic only), rather than in raypt.config: tasks size their models from them,
and config imports the task registry, so tasks cannot import config.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from raypt.schema import Section

BATCH_KEY = {"text": "input_ids", "image": "pixel_values", "audio": "audio_features"}  # each modality's batch key

Share = Annotated[float, Field(gt=0, le=1)]
Mean = Annotated[float, Field(ge=0, le=1)]


class ImageConfig(Section):
    """Image decoding and training augmentations (done in Ray Data read tasks, seeded by each sample's place in the
    global order, so a resumed run repeats them exactly); evaluation fits the whole image, unaugmented."""
    size: int = Field(32, ge=8, description="side in pixels of the square crops fed to the model")
    crop_scale: tuple[Share, Share] = Field(
        (0.35, 1.0), description="(low, high): training crops cover a random share of the image's area in this "
        "range (a random-resized crop, aspect ratio 3/4 to 4/3); (1, 1) = whole-image crops")
    flip: bool = Field(True, description="mirror training views left-right with probability 0.5")
    jitter: float = Field(0.4, ge=0, le=1, description="training views' brightness, contrast and saturation are "
                          "each scaled by a random factor in [1 - jitter, 1 + jitter]; 0 = off")
    views: Literal[1, 2] = Field(1, description="augmented views per image (2 for contrastive tasks; MAE and "
                                 "multimodal learn from the first)")
    mean: tuple[Mean, Mean, Mean] = Field((0.485, 0.456, 0.406), description="per-channel (RGB) mean subtracted "
                                          "from pixels scaled to [0, 1]")
    std: tuple[Share, Share, Share] = Field((0.229, 0.224, 0.225), description="per-channel (RGB) standard "
                                            "deviation the centred pixels are divided by")

    @field_validator("crop_scale")
    @classmethod
    def _ordered(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if scale[0] > scale[1]:
            raise ValueError(f"data.image.crop_scale: got {list(scale)}; need low <= high")
        return scale


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
