"""The contrastive model on one screen: a ViT encoder, C projection heads and (for AMCL) the shared temperature
network, with the loss computed inside `forward` so that DeepSpeed sees every parameter used in one call (ZeRO-3
gathers each module's weights in its forward hooks, in the order the first step traced).

The encoder is transformers' ViTModel, not a ResNet as in the paper: LayerNorm normalises each row by itself, so a
rank's forward does not depend on which other rows share its micro-batch and 2 workers x B/2 compute what 1 worker
x B does. BatchNorm's batch statistics would make the loss depend on the world size unless synchronised. The
feature a probe reads (and an exported encoder gives) is the mean of the last hidden state over all tokens.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn
from transformers import ViTConfig, ViTModel

from raypt.contrastive.loss import NegAgg, TemperatureNet, amcl_loss


def features(encoder: ViTModel, pixels: Tensor) -> Tensor:
    """[rows, 3, S, S] -> [rows, hidden]: the encoder's last hidden state averaged over its tokens (CLS and
    patches). What `raypt export` users compute from `AutoModel.from_pretrained(export)` to get the same vectors."""
    return encoder(pixel_values=pixels).last_hidden_state.mean(1)


class ContrastiveModel(nn.Module):
    def __init__(self, encoder: ViTConfig, heads: int, proj_hidden: int, proj_dim: int,
                 temperature: Union[TemperatureNet, float], beta: float, negatives: NegAgg, topk: int):
        super().__init__()
        self.encoder = ViTModel(encoder, add_pooling_layer=False)
        width = encoder.hidden_size
        # C heads of one architecture with independent weights (AMCL's g_1..g_C; SimCLR: one).
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(width, proj_hidden), nn.ReLU(),
                                                 nn.Linear(proj_hidden, proj_dim)) for _ in range(heads))
        self.temperature = temperature  # a module (adaptive) or a float (fixed)
        self.beta, self.negatives, self.topk = beta, negatives, topk

    @property
    def dtype(self) -> torch.dtype:
        """What inputs are cast to (DeepSpeed's bf16 casts the weights, not the batch)."""
        return self.encoder.embeddings.patch_embeddings.projection.weight.dtype

    def forward(self, pixel_values: Tensor, features_only: bool = False):
        """pixel_values [rows, 2 views, 3, S, S] -> (loss of this rank's rows against every rank's, diagnostics);
        with `features_only`, [rows, 3, S, S] -> the frozen features a probe reads."""
        if features_only:
            return features(self.encoder, pixel_values)
        rows = pixel_values.shape[0]
        h = features(self.encoder, pixel_values.flatten(0, 1))  # both views in one pass: [rows * 2, hidden]
        z = torch.stack([head(h) for head in self.heads], 1).unflatten(0, (rows, 2))  # [rows, 2, C, d]
        beta = self.beta if isinstance(self.temperature, TemperatureNet) else 0.0  # a fixed t has no regulariser
        return amcl_loss(z[:, 0], z[:, 1], self.temperature, beta=beta, neg_agg=self.negatives, topk=self.topk)
