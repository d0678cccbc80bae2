"""Masked image modelling (MAE, He et al. 2021) with transformers' ViTMAEForPreTraining."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from raypt.tasks.base import Task, TaskConfig, register, sample_noise
from raypt.tasks.vit import recompute_flops, save_image_processor, transformer_flops

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import ViTMAEConfig


class MaeConfig(TaskConfig):
    """A ViT encoder sees the kept patches; a small decoder predicts the pixels of the masked ones."""
    task: Literal["mae"] = "mae"
    patch_size: int = Field(4, ge=1, description="side in pixels of the square patches (tokens) images are cut "
                            "into; data.image.size must be a multiple")
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="share of patches hidden from the encoder")
    decoder_hidden_size: int = Field(64, ge=8, description="width of the decoder")
    decoder_layers: int = Field(2, ge=1, description="transformer blocks of the decoder")


@register
class MaeTask(Task):
    name = "mae"
    modalities = ("image",)
    Config = MaeConfig

    def hf_config(self) -> ViTMAEConfig:
        """Encoder sizes from the job; the decoder keeps the encoder's head width where its size allows."""
        from transformers import ViTMAEConfig

        m = self.cfg.model
        head_dim, dec = m.hidden_size // m.num_heads, m.decoder_hidden_size
        dec_heads = next(h for h in range(max(1, dec // head_dim), 0, -1) if dec % h == 0)
        return ViTMAEConfig(
            image_size=self.cfg.data.image.size, patch_size=m.patch_size, hidden_size=m.hidden_size,
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
            intermediate_size=m.intermediate_size or 4 * m.hidden_size, initializer_range=m.init_std,
            decoder_hidden_size=dec, decoder_num_hidden_layers=m.decoder_layers, decoder_num_attention_heads=dec_heads,
            decoder_intermediate_size=4 * dec, mask_ratio=m.mask_ratio, norm_pix_loss=True,
        )

    def construct(self) -> nn.Module:
        from transformers import ViTMAEForPreTraining

        return ViTMAEForPreTraining(self.hf_config())

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Pixel loss on the masked patches; each sample's mask is its own, keyed by its place in the data."""
        pixels = batch["pixel_values"]
        if pixels.ndim == 5:  # [rows, views, 3, S, S]: MAE needs one view
            pixels = pixels[:, 0]
        noise = sample_noise(batch["position"], self.cfg.run.seed, self.tokens_per_sample("image"))
        # DeepSpeed bf16 does not cast inputs
        return model(pixel_values=pixels.to(model.dtype), noise=noise.to(pixels.device)).loss.float(), {}

    def tokens_per_sample(self, modality: str) -> int:
        return (self.cfg.data.image.size // self.cfg.model.patch_size) ** 2

    def flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """Every patch is embedded, the encoder sees the kept ones + CLS, the decoder all + CLS (PaLM-style count)."""
        hf = model.config
        patches = (hf.image_size // hf.patch_size) ** 2
        kept = int(patches * (1 - hf.mask_ratio)) + 1
        pixels = hf.patch_size ** 2 * hf.num_channels
        encoder = transformer_flops(hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, kept)
        decoder = transformer_flops(hf.decoder_hidden_size, hf.decoder_num_hidden_layers,
                                    hf.decoder_intermediate_size, patches + 1)
        # the patch embedding takes pixels, which need no gradient: forward and weight gradient only (4x)
        heads = 4 * patches * pixels * hf.hidden_size + 6 * hf.decoder_hidden_size * (
            kept * hf.hidden_size + (patches + 1) * pixels)
        return float(encoder + decoder + heads)

    def recompute_flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """The encoder's and the decoder's blocks, forward once more (raypt.tasks.vit.recompute_flops)."""
        hf = model.config
        patches = (hf.image_size // hf.patch_size) ** 2
        kept = int(patches * (1 - hf.mask_ratio)) + 1
        return (recompute_flops(hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, kept)
                + recompute_flops(hf.decoder_hidden_size, hf.decoder_num_hidden_layers, hf.decoder_intermediate_size,
                                  patches + 1))

    def export(self, model: nn.Module, out_dir: str) -> None:
        """A folder that ViTMAEForPreTraining / AutoImageProcessor.from_pretrained load offline, preprocessing
        (bicubic resize, mean/std) as training did."""
        model.save_pretrained(out_dir, safe_serialization=True)
        save_image_processor(self.cfg.data.image, out_dir)
