"""Which parameters a sparse run prunes: every linear layer's weight (the paper's `kernel`s), never embeddings, norms
or biases; the output head only when asked, and never when it is tied to the input embedding."""
from __future__ import annotations

from torch import nn

from raypt.schema import ConfigError
from raypt.sparsity.config import SparsityConfig


def prunable(model: nn.Module, cfg: SparsityConfig) -> list[str]:
    """Names (as `named_parameters` gives them) of the weights `cfg` prunes, in that order."""
    names = {id(p): n for n, p in model.named_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = set()
    for module in model.modules():
        if not isinstance(module, nn.Linear) or id(module.weight) in embeddings:  # a tied head is an embedding
            continue
        if module is head and not cfg.prune_head:
            continue
        chosen.add(id(module.weight))
    unmatched = [e for e in cfg.exclude if not any(e in names[i] for i in chosen)]
    if unmatched:
        raise ConfigError(f"sparsity.exclude: {unmatched} match no prunable weight; prunable: "
                          f"{sorted(names[i] for i in chosen)}")
    return [n for n, p in model.named_parameters() if id(p) in chosen and not any(e in n for e in cfg.exclude)]
