"""Causal language modelling with a Llama-family decoder (RMSNorm, RoPE, SwiGLU, SDPA) from transformers."""
from __future__ import annotations

import tempfile

import pyarrow.fs as pafs
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raypt import storage

def hf_config(cfg, manifests: dict[str, dict]) -> LlamaConfig:
    """Sizes come from the job, vocabulary and context from the prepared dataset."""
    m, text = cfg.model, manifests["text"]
    inter = m.intermediate_size or 32 * round(8 * m.hidden_size / 3 / 32)
    eos = text["eos_id"]
    return LlamaConfig(
        vocab_size=text["vocab_size"], hidden_size=m.hidden_size, intermediate_size=inter,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=text["seq_len"],
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa",
    )


def build_model(cfg, manifests: dict[str, dict], seed: int) -> LlamaForCausalLM:
    """Same seed -> same weights on every rank and every ZeRO stage."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config(cfg, manifests))


def loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    return model(input_ids=ids, labels=ids).loss.float()


def tokens_per_sample(cfg, manifests: dict[str, dict], modality: str) -> int:
    return manifests["text"]["seq_len"]


def flops_per_sample(model: torch.nn.Module, cfg, modality: str) -> float:
    """Training FLOPs per sequence: 6 x matmul parameters + attention scores, per token (PaLM appendix B)."""
    hf = model.config
    d, layers, inter, vocab = hf.hidden_size, hf.num_hidden_layers, hf.intermediate_size, hf.vocab_size
    seq = hf.max_position_embeddings
    kv = d * hf.num_key_value_heads // hf.num_attention_heads
    matmul_params = layers * (d * d * 2 + d * kv * 2 + 3 * d * inter) + d * vocab
    return (6 * matmul_params + 12 * layers * d * seq) * seq


def export(model: torch.nn.Module, cfg, manifests: dict[str, dict], out_dir: str) -> None:
    """A Hugging Face folder (safetensors, config, tokenizer) that transformers loads without raypt."""
    from transformers import AutoTokenizer

    model.save_pretrained(out_dir, safe_serialization=True)
    text = manifests["text"]
    fs, root = storage.resolve(storage.join(text["root"], text["tokenizer"]))
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        AutoTokenizer.from_pretrained(tmp).save_pretrained(out_dir)
