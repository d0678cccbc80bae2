"""Export a checkpoint through its task (Hugging Face folders for text and MAE) and sample from a text export."""
from __future__ import annotations

import os

import torch

from raypt import checkpoint
from raypt.config import JobConfig
from raypt.data.manifest import read_manifest
from raypt.tasks import by_modality, get_task


def export(checkpoint_dir: str, cfg: JobConfig, out_dir: str) -> str:
    checkpoint.read_state(checkpoint_dir)  # refuse a torn checkpoint
    manifests = by_modality([read_manifest(s.path) for s in cfg.data.mix()])
    task = get_task(cfg.model.task)(cfg, manifests)
    model = task.build_model(cfg.run.seed)
    checkpoint.load_weights(model, checkpoint_dir)
    task.export(model, out_dir)
    return out_dir


def resolve_export(path: str) -> str:
    """Accept a run folder or an export folder."""
    inner = os.path.join(path, "export")
    return inner if os.path.isfile(os.path.join(inner, "config.json")) else path


def generate(path: str, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_export(path)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=top_k, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
