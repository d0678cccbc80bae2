"""Hugging Face export (safetensors + config + tokenizer) that transformers loads without raypt, and sampling."""
from __future__ import annotations

import os
import tempfile

import pyarrow.fs as pafs
import torch

from raypt import checkpoint, storage
from raypt.config import JobConfig
from raypt.data.manifest import read_manifest
from raypt.tasks import clm


def export(checkpoint_dir: str, cfg: JobConfig, out_dir: str) -> str:
    from transformers import AutoTokenizer, LlamaForCausalLM

    checkpoint.read_state(checkpoint_dir)  # refuse a torn checkpoint
    manifest = read_manifest(cfg.data.path)
    model = LlamaForCausalLM(clm.hf_config(cfg.model, manifest))
    checkpoint.load_weights(model, checkpoint_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    fs, root = storage.resolve(storage.join(cfg.data.path, manifest["tokenizer"]))
    with tempfile.TemporaryDirectory() as tmp:
        pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        AutoTokenizer.from_pretrained(tmp).save_pretrained(out_dir)
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
