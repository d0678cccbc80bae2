"""The Llama decoder as a sequence of pipeline layers (DeepSpeed's `PipelineModule`), made of the same transformers
modules as LlamaForCausalLM, so that a stage builds only its own layers and each parameter keeps the name and the
initial value (raypt.models.init) it has in the full model.

Layers: the token embedding, each decoder block, the final norm, the output projection. Only the hidden states
travel between stages (a float tensor, what DeepSpeed's pipeline sends and returns gradients for). Each block
recomputes RoPE's cos/sin for positions 0..T-1, the values LlamaModel computes once, and runs without an attention
mask: SDPA's causal path, as LlamaModel takes it for unpadded sequences. With tied embeddings the output
projection is the embedding layer itself (`TiedLayerSpec`): DeepSpeed keeps its copies on the first and last
stages equal by summing their gradients.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

if TYPE_CHECKING:
    from transformers import LlamaConfig


class Layer:
    """What the pipeline engine asks of a layer: where its modules sit in the whole model (`prefix`), and which
    modules to initialise by name there, in the whole model's order."""
    prefix: str

    def init_parts(self) -> list[tuple[nn.Module, str]]:
        return [(self, self.prefix)]  # type: ignore[list-item]


class Embedding(Layer, nn.Module):
    prefix = "model"

    def __init__(self, config: "LlamaConfig"):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class TiedEmbedding(Embedding):
    """The embedding whose matrix is also the output projection. LlamaForCausalLM initialises the output
    projection after the embedding, overwriting the shared matrix: so does this layer."""

    def init_parts(self) -> list[tuple[nn.Module, str]]:
        projection = Head(self.config)
        projection.lm_head.weight = self.embed_tokens.weight
        return [(self, self.prefix), (projection, projection.prefix)]


def tied_projection(embedding: Embedding, hidden: torch.Tensor) -> torch.Tensor:
    """The output projection of a model whose embeddings are tied: the embedding matrix, transposed."""
    return nn.functional.linear(hidden, embedding.embed_tokens.weight)


class Block(Layer, LlamaDecoderLayer):
    def __init__(self, config: "LlamaConfig", layer_idx: int):
        super().__init__(config, layer_idx)
        self.prefix = f"model.layers.{layer_idx}"
        self.rotary_emb = LlamaRotaryEmbedding(config)  # buffers only: no parameter, nothing in a checkpoint

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        return super().forward(hidden, position_ids=positions,
                               position_embeddings=self.rotary_emb(hidden, position_ids=positions))


class Norm(Layer, nn.Module):
    prefix = "model"

    def __init__(self, config: "LlamaConfig"):
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden)


class Head(Layer, nn.Module):
    prefix = ""

    def __init__(self, config: "LlamaConfig"):
        super().__init__()
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def layer_specs(config: "LlamaConfig") -> list:
    """The model's layers in order, as DeepSpeed specs (each built only by the stage that holds it)."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    blocks = [LayerSpec(Block, config, i) for i in range(config.num_hidden_layers)]
    if config.tie_word_embeddings:
        weight = "embed_tokens.weight"
        return [TiedLayerSpec("embed", TiedEmbedding, config, tied_weight_attr=weight), *blocks,
                LayerSpec(Norm, config),
                TiedLayerSpec("embed", TiedEmbedding, config, forward_fn=tied_projection, tied_weight_attr=weight)]
    return [LayerSpec(Embedding, config), *blocks, LayerSpec(Norm, config), LayerSpec(Head, config)]


def row_losses(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Each row's mean next-token cross-entropy (in fp32), as LlamaForCausalLM's loss averages over a batch of
    unpadded rows."""
    shifted = logits[:, :-1].float()
    ce = nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), input_ids[:, 1:].reshape(-1),
                                     reduction="none")
    return ce.view(input_ids.shape[0], -1).mean(1)
