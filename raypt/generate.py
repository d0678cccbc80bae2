"""`raypt generate`: sample a continuation from a text export, found in a run or export folder (local or s3://).
Cheap to import: a path that holds no export is refused before torch and transformers load."""
from __future__ import annotations

import json

from raypt import storage
from raypt.schema import ConfigError


def resolve_export(path: str) -> str:
    """The export folder of `path`, a run folder or an export folder (local or s3://); a ConfigError naming the
    path when it holds neither."""
    for folder in (storage.join(path, "export"), path):
        try:
            described = json.loads(storage.read_text(storage.join(folder, "config.json")))
        except FileNotFoundError:
            continue
        if not any(a.endswith("ForCausalLM") for a in described.get("architectures", [])):
            raise ConfigError(f"path: '{folder}' holds a {', '.join(described.get('architectures', ['?']))} "
                              f"export; generate samples text from model.task 'clm' exports only")
        return folder
    raise ConfigError(f"path: '{path}' is neither a run folder with an export nor an export folder (no "
                      f"config.json); export a run with `raypt export JOB`")


def generate(path: str, prompt: str, max_new_tokens: int = 80, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0) -> str:
    """A continuation of `prompt` by the export of `path`; transformers only ever sees a local folder."""
    folder = resolve_export(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raypt.checkpoint import local_copy

    with local_copy(folder) as local:
        try:
            tok = AutoTokenizer.from_pretrained(local, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(local, local_files_only=True).eval()
        except OSError as e:  # a torn export: transformers names the file it misses
            raise ConfigError(f"path: '{path}' holds an incomplete export: {str(e).splitlines()[0]}") from None
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=top_k, pad_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)
