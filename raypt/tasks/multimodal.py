"""One Llama trunk for text, images and audio, each modality a causal sequence of its own tokens with its own
input and output heads (the model: raypt.models.multimodal). Exports as model.safetensors + config.json, which
`load` rebuilds without a job."""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from raypt.data.features import BATCH_KEY
from raypt.tasks import llama
from raypt.tasks.base import Task, TaskConfig, register

if TYPE_CHECKING:
    from torch import Tensor, nn


class MultimodalConfig(TaskConfig):
    """A shared Llama-family trunk; every modality predicts its own next token."""
    task: Literal["multimodal"] = "multimodal"
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base: larger = slower-rotating positions, for "
                              "longer contexts")
    patch_size: int = Field(4, ge=1, description="images: side in pixels of the square patches (tokens), "
                            "data.image.size must be a multiple; audio: mel frames per token (a shorter remainder "
                            "is dropped)")


@register
class MultimodalTask(Task):
    name = "multimodal"
    modalities = ("text", "image", "audio")
    Config = MultimodalConfig

    def sizes(self) -> dict:
        """Everything the model's shape depends on (written as config.json by export). Tokens per sample: text
        positions, image patches, audio patches of `patch_size` mel frames (a shorter remainder is dropped)."""
        from raypt.data.decode import audio_frames

        m, p, data = self.cfg.model, self.cfg.model.patch_size, self.cfg.data
        out = dict(hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                   num_kv_heads=m.num_kv_heads or m.num_heads, intermediate_size=llama.intermediate_size(m),
                   rope_theta=m.rope_theta, init_std=m.init_std, patch_size=p)
        lengths, token_dims = {}, {}  # in `modalities` order, which fixes the order modules run in
        if "text" in self.manifests:
            out.update(vocab_size=self.manifests["text"]["vocab_size"])
            lengths["text"] = self.manifests["text"]["seq_len"]
        if "image" in self.manifests:
            out.update(image_size=data.image.size)
            lengths["image"], token_dims["image"] = (data.image.size // p) ** 2, p * p * 3
        if "audio" in self.manifests:
            out.update(n_mels=data.audio.n_mels, frames=audio_frames(data.audio))
            lengths["audio"], token_dims["audio"] = out["frames"] // p, p * data.audio.n_mels
        return {**out, "lengths": lengths, "token_dims": token_dims}

    def construct(self) -> nn.Module:
        from raypt.models.multimodal import Multimodal

        return Multimodal(self.sizes())

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Through the model's own forward, so ZeRO-3 hooks see every call."""
        return model(**{key: batch[key] for key in BATCH_KEY.values() if key in batch}).float(), {}

    def tokens_per_sample(self, modality: str) -> int:
        return self.sizes()["lengths"][modality]

    def flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """One sample's own tokens (padding excluded) through the trunk and its modality's heads."""
        c = model.config
        d = c["hidden_size"]
        heads = c["vocab_size"] if modality == "text" else 2 * c["token_dims"][modality]  # text input is a lookup
        return llama.training_flops(d, c["num_layers"], c["num_heads"], c["num_kv_heads"], c["intermediate_size"],
                                    d * heads, c["lengths"][modality])

    def recompute_flops_per_sample(self, model: nn.Module, modality: str) -> float:
        c = model.config
        return llama.recompute_flops(c["hidden_size"], c["num_layers"], c["num_heads"], c["num_kv_heads"],
                                     c["intermediate_size"], c["lengths"][modality])

    def export(self, model: nn.Module, out_dir: str) -> None:
        """model.safetensors + config.json, which `load` rebuilds."""
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out_dir, "model.safetensors"))
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(model.config, f, indent=2)


def load(out_dir: str) -> nn.Module:
    """An exported model, without the job that trained it."""
    from safetensors.torch import load_file

    from raypt.models.multimodal import Multimodal

    with open(os.path.join(out_dir, "config.json")) as f:
        model = Multimodal(json.load(f))
    model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")))
    return model
