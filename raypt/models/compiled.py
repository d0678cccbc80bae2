"""`fast.compile`: each transformer block through torch.compile, in place.

A block is what transformers checkpoints one at a time (a `GradientCheckpointingLayer`: Llama's decoder layer,
ViT's layer), in every task's model and in a pipeline stage's layers alike. `Module.compile` keeps the module and
its parameters where they are, so parameter names, the optimizer's groups and checkpoints are those of an
uncompiled run; the embedding, the head and the loss stay eager. The first steps pay the compile (a C++ compiler on
CPU, Triton on GPUs); a new input shape compiles once more, then runs shape-generic.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module) -> nn.Module:
    """Compile every transformer block inside `model`; an error when there is none (the switch is never a silent
    no-op)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not blocks:
        raise ValueError(f"fast.compile: true, but {type(model).__name__} holds no transformer block to compile")
    for block in blocks:
        block.compile()
    return model
