"""Tasks: what a model learns from which modalities. Each module offers the same small interface:
build_model, loss, tokens_per_sample, flops_per_sample and export."""
from __future__ import annotations

import importlib
from types import ModuleType

from raypt.data.manifest import modality

MODALITIES = {"clm": ("text",), "mae": ("image",), "multimodal": ("text", "image", "audio")}  # what each takes;
# the order of multimodal's is the order its modules run in


def get_task(name: str) -> ModuleType:
    if name not in MODALITIES:
        raise ValueError(f"model.task: got {name!r}; allowed: {', '.join(MODALITIES)}")
    return importlib.import_module(f"raypt.tasks.{name}")


def by_modality(manifests: list[dict]) -> dict[str, dict]:
    """The first dataset of each modality speaks for it (text sources share one tokenizer)."""
    out: dict[str, dict] = {}
    for m in manifests:
        out.setdefault(modality(m), m)
    return out
