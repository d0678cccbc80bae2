"""One Llama trunk (RMSNorm, RoPE, SwiGLU, SDPA) for text, images and audio: every modality is a causal
sequence of its own tokens, with its own input and output heads (next token; next patch of pixels like AIM,
El-Nouby et al. 2024; next patch of log-mel frames)."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, LlamaModel

from raypt.data import decode
from raypt.data.stream import BATCH_KEY as KEYS
from raypt.tasks import MODALITIES as TASK_MODALITIES

MODALITIES = TASK_MODALITIES["multimodal"]


def sizes(cfg: Any, manifests: dict[str, dict]) -> dict:
    """Everything the model's shape depends on (written as config.json by export). Tokens per sample: text
    positions, image patches, audio patches of `patch_size` mel frames (a shorter remainder is dropped)."""
    m, p = cfg.model, cfg.model.patch_size
    out = dict(hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
               num_kv_heads=m.num_kv_heads or m.num_heads,
               intermediate_size=m.intermediate_size or 32 * round(8 * m.hidden_size / 3 / 32),
               rope_theta=m.rope_theta, init_std=m.init_std, patch_size=p)
    lengths, token_dims = {}, {}  # in MODALITIES order, which fixes the order modules run in
    if "text" in manifests:
        out.update(vocab_size=manifests["text"]["vocab_size"])
        lengths["text"] = manifests["text"]["seq_len"]
    if "image" in manifests:
        out.update(image_size=cfg.data.image.size)
        lengths["image"], token_dims["image"] = (cfg.data.image.size // p) ** 2, p * p * 3
    if "audio" in manifests:
        out.update(n_mels=cfg.data.audio.n_mels, frames=decode.audio_frames(cfg.data.audio))
        lengths["audio"], token_dims["audio"] = out["frames"] // p, p * cfg.data.audio.n_mels
    return {**out, "lengths": lengths, "token_dims": token_dims}


class Multimodal(nn.Module):
    """Input head + modality embedding -> shared causal trunk -> output head, for each modality."""

    def __init__(self, config: dict):
        super().__init__()
        self.config, c, d = config, config, config["hidden_size"]
        self.modalities = list(c["lengths"])
        self.trunk = LlamaModel(LlamaConfig(
            vocab_size=1, hidden_size=d, intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_layers"],
            num_attention_heads=c["num_heads"], num_key_value_heads=c["num_kv_heads"],
            max_position_embeddings=max(c["lengths"].values()), rope_theta=c["rope_theta"],
            initializer_range=c["init_std"], use_cache=False, bos_token_id=None, eos_token_id=None,
            pad_token_id=None, attn_implementation="sdpa"))
        del self.trunk.embed_tokens  # inputs always arrive as embeddings, from the heads below
        dims = c["token_dims"]
        self.embed = nn.ModuleDict({m: nn.Embedding(c["vocab_size"], d) if m == "text" else nn.Linear(dims[m], d)
                                    for m in self.modalities})
        self.modality = nn.Embedding(len(self.modalities), d)
        self.head = nn.ModuleDict({m: nn.Linear(d, c["vocab_size"], bias=False) if m == "text" else
                                   nn.Linear(d, dims[m]) for m in self.modalities})
        for module in (*self.embed.values(), self.modality, *self.head.values()):
            nn.init.normal_(module.weight, std=c["init_std"])
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def tokens(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        """Rows -> token sequences: ids [n, L], pixel patches [n, N, p*p*3], or log-mel patches [n, F/p, p*mels]."""
        p = self.config["patch_size"]
        if modality == "text":
            return x
        if modality == "image":
            return decode.patchify(x[:, 0] if x.ndim == 5 else x, p)  # two views: the first
        n = x.shape[-1] // p
        return x[..., :n * p].unflatten(-1, (n, p)).permute(0, 2, 3, 1).flatten(2)

    def row_losses(self, modality: str, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row mean loss of predicting token t+1 from positions <= t."""
        pred = self.head[modality](hidden[:, :-1]).float()
        if modality == "text":
            return F.cross_entropy(pred.transpose(1, 2), target[:, 1:], reduction="none").mean(1)
        want = target[:, 1:].float()
        if modality == "image":  # AIM / MAE norm_pix_loss: each patch's pixels normalised on their own
            want = F.layer_norm(want, want.shape[-1:], eps=1e-6)
        return (pred - want).pow(2).mean((1, 2))

    def forward(self, input_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                audio_features: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean per-row loss. Each modality given (even with 0 rows) runs the same modules in the same order and
        the trunk runs once, so ZeRO-3 ranks gather parameters in step whatever their rows."""
        given = dict(zip(MODALITIES, (input_ids, pixel_values, audio_features)))
        present = [m for m in self.modalities if given[m] is not None]
        targets = [self.tokens(m, given[m]) for m in present]
        # DeepSpeed's bf16 engine does not cast inputs: features meet their head in its dtype.
        parts = [self.embed[m](t if m == "text" else t.to(self.embed[m].weight.dtype))
                 for m, t in zip(present, targets)]
        width = max(e.shape[1] for e in parts)
        # Right padding under causal attention: no real position ever sees a padded one, so SDPA needs no mask.
        x = torch.cat([F.pad(e, (0, 0, 0, width - e.shape[1])) for e in parts])
        kinds = torch.cat([torch.full((len(e),), self.modalities.index(m), device=x.device)
                           for m, e in zip(present, parts)])
        x = x + self.modality(kinds)[:, None]
        rows = len(x)
        if not rows:  # LlamaModel cannot take 0 rows: one padded row, weighted 0, keeps every module's call
            x = F.pad(x, (0, 0, 0, 0, 0, 1))
        hidden = self.trunk(inputs_embeds=x).last_hidden_state
        losses, start = [], 0
        for m, e, t in zip(present, parts, targets):
            n, length = e.shape[:2]
            losses.append(self.row_losses(m, hidden[start:start + n, :length], t))
            start += n
        return torch.cat(losses).sum() / max(rows, 1)


def build_model(cfg: Any, manifests: dict[str, dict], seed: int) -> Multimodal:
    """Same seed -> same weights on every rank and every ZeRO stage."""
    torch.manual_seed(seed)
    return Multimodal(sizes(cfg, manifests))


def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Through the model's own forward, so ZeRO-3 hooks see every call."""
    return model(**{key: batch[key] for key in KEYS.values() if key in batch}).float()


def tokens_per_sample(cfg: Any, manifests: dict[str, dict], modality: str) -> int:
    return sizes(cfg, manifests)["lengths"][modality]


def flops_per_sample(model: torch.nn.Module, cfg: Any, modality: str) -> float:
    """Training FLOPs of one sample's own tokens (padding excluded): 6 x matmul parameters + attention scores."""
    c = model.config
    d, layers, inter, tokens = c["hidden_size"], c["num_layers"], c["intermediate_size"], c["lengths"][modality]
    kv = d * c["num_kv_heads"] // c["num_heads"]
    heads = c["vocab_size"] if modality == "text" else 2 * c["token_dims"][modality]  # text input is a lookup
    matmul_params = layers * (d * d * 2 + d * kv * 2 + 3 * d * inter) + d * heads
    return float((6 * matmul_params + 12 * layers * d * tokens) * tokens)


def export(model: torch.nn.Module, cfg: Any, manifests: dict[str, dict], out_dir: str) -> None:
    """model.safetensors + config.json, which `load` rebuilds."""
    os.makedirs(out_dir, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)


def load(out_dir: str) -> Multimodal:
    with open(os.path.join(out_dir, "config.json")) as f:
        model = Multimodal(json.load(f))
    model.load_state_dict(load_file(os.path.join(out_dir, "model.safetensors")))
    return model
