"""The Llama-family trunk's sizing rule and FLOPs count, shared by every task built on it (clm, multimodal)."""
from __future__ import annotations

from raypt.tasks.base import TaskConfig


def intermediate_size(m: TaskConfig) -> int:
    """The MLP width: as set, else Llama's 8/3 x hidden_size (SwiGLU keeps a 4x MLP's parameters), rounded to 32."""
    return m.intermediate_size or 32 * round(8 * m.hidden_size / 3 / 32)


def training_flops(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, head_params: int,
                   tokens: int) -> float:
    """Training FLOPs of one sequence of `tokens` through the trunk and its input/output heads (`head_params`
    matmul parameters): 6 x matmul parameters per token + attention scores (PaLM, appendix B)."""
    kv = hidden * kv_heads // heads
    matmul_params = layers * (hidden * hidden * 2 + hidden * kv * 2 + 3 * hidden * inter) + head_params
    return float((6 * matmul_params + 12 * layers * hidden * tokens) * tokens)


def recompute_flops(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, tokens: int) -> float:
    """What activation checkpointing adds for one sequence: each block's forward again, up to the last tensor
    the backward needs. torch's recomputation stops there, so the MLP's down projection (whose output only feeds
    the residual sum) is not run again."""
    forward = training_flops(hidden, layers, heads, kv_heads, inter, 0, tokens) / 3
    return forward - 2.0 * layers * hidden * inter * tokens
