"""Causal language modelling with a Llama-family decoder (RMSNorm, RoPE, SwiGLU, SDPA) from transformers."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raypt.config import ModelConfig


def hf_config(cfg: ModelConfig, manifest: dict) -> LlamaConfig:
    """Sizes come from the job, vocabulary and context from the prepared dataset."""
    inter = cfg.intermediate_size or 32 * round(8 * cfg.hidden_size / 3 / 32)
    eos = manifest["eos_id"]
    return LlamaConfig(
        vocab_size=manifest["vocab_size"], hidden_size=cfg.hidden_size, intermediate_size=inter,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads or cfg.num_heads, max_position_embeddings=manifest["seq_len"],
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, initializer_range=cfg.init_std,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa",
    )


def build_model(cfg: ModelConfig, manifest: dict, seed: int) -> LlamaForCausalLM:
    """Same seed -> same weights on every rank and every ZeRO stage."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config(cfg, manifest))


def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids).loss.float()


def flops_per_token(hf: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + attention scores (PaLM appendix B)."""
    d, layers, inter, vocab = hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, hf.vocab_size
    kv = d * hf.num_key_value_heads // hf.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * inter
    matmul_params = layers * per_layer + d * vocab
    return 6 * matmul_params + 12 * layers * d * seq_len
