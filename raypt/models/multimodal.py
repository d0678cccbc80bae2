"""One Llama trunk (RMSNorm, RoPE, SwiGLU, SDPA) for text, images and audio: every modality is a causal sequence
of its own tokens, with its own input and output heads (next token; next patch of pixels like AIM, El-Nouby et al.
2024; next patch of log-mel frames). Its sizes come from raypt.tasks.multimodal, which builds and exports it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaModel

from raypt.data import decode


class Multimodal(nn.Module):
    """Input head + modality embedding -> shared causal trunk -> output head, for each modality."""

    def __init__(self, config: dict):
        super().__init__()
        self.config, c, d = config, config, config["hidden_size"]
        self.modalities = list(c["lengths"])  # the order the modules run in
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

    def _init_weights(self, module: nn.Module) -> None:
        """The heads' rule, as raypt.models.init applies it by name (the trunk has transformers' own)."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config["init_std"])
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
        given = {"text": input_ids, "image": pixel_values, "audio": audio_features}
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
