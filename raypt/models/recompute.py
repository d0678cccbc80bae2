"""Activation checkpointing (`fast.activation_checkpointing`): each transformer block keeps only its input and
recomputes its activations in the backward pass.

Every task's model is made of transformers models (a causal LM, the multimodal trunk, the MAE encoder and
decoder, the contrastive towers), so the switch is transformers' own per-layer checkpointing, turned on in each of
them, with torch's non-reentrant checkpoint (it keeps RNG state and works where no input needs a gradient, as
under ZeRO-3's hooks). A pipeline stage checkpoints its blocks through DeepSpeed (raypt/engines/pipeline.py).
"""
from __future__ import annotations

from torch import nn

NON_REENTRANT = {"use_reentrant": False}


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Turn on per-block recomputation in every transformers model inside `model`; an error when there is none
    (the switch is never a silent no-op)."""
    from transformers import PreTrainedModel

    found, covered = [], set()  # the outermost ones: enabling one reaches every layer inside it
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing and id(m) not in covered:
            found.append(m)
            covered.update(id(sub) for sub in m.modules())
    if not found:
        raise ValueError(f"fast.activation_checkpointing: true, but {type(model).__name__} holds no transformers "
                         "model that supports gradient checkpointing")
    for m in found:
        m.activation_checkpointing_enable(activation_checkpointing_kwargs=NON_REENTRANT)
    return model
