"""What the ViT tasks (mae, contrastive) share: the FLOPs of a transformer stack and the image processor their
exports carry."""
from __future__ import annotations

from typing import Any


def transformer_flops(hidden: int, layers: int, inter: int, tokens: int) -> float:
    """Training FLOPs of `tokens` through a ViT stack: 6 x (QKVO + 2-matrix MLP) + attention scores."""
    return tokens * (6 * layers * (4 * hidden * hidden + 2 * hidden * inter) + 12 * layers * hidden * tokens)


def recompute_flops(hidden: int, layers: int, inter: int, tokens: int) -> float:
    """What activation checkpointing adds for `tokens` through a ViT stack: each block's forward again but its
    MLP's output projection, where torch's recomputation stops (raypt.tasks.llama.recompute_flops)."""
    return transformer_flops(hidden, layers, inter, tokens) / 3 - 2.0 * layers * hidden * inter * tokens


def save_image_processor(image: Any, out_dir: str) -> None:
    """An image processor that `AutoImageProcessor.from_pretrained(out_dir)` loads offline and that preprocesses as
    evaluation did (bicubic resize to data.image.size, the job's mean and std)."""
    from PIL import Image
    from transformers import ViTImageProcessorPil  # PIL's backend by name: torchvision's is not installed

    ViTImageProcessorPil(size={"height": image.size, "width": image.size}, resample=Image.Resampling.BICUBIC,
                         image_mean=list(image.mean), image_std=list(image.std)).save_pretrained(out_dir)
