"""Which tokenizer a text dataset is tokenized with: one trained here, or one reused from a prepared dataset or a
Hugging Face folder, so that sources mixed in a run, or data for a model continued from an export, share a
vocabulary."""
from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from raypt import storage
from raypt.data.manifest import MANIFEST
from raypt.schema import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

EOS = "<|endoftext|>"
HF_TOKENIZER = "tokenizer_config.json"  # what save_pretrained always writes, and AutoTokenizer reads first
WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".gguf")


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on `texts`, its end-of-text token the document separator."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS)


def tokenizer_folder(location: str, field: str) -> str:
    """The folder of tokenizer files that `prepare.tokenizer` names: a prepared text dataset's (its manifest says
    which), or the location itself when it is a Hugging Face folder."""
    try:
        return storage.join(location, storage.read_json(storage.join(location, MANIFEST))["tokenizer"])
    except (FileNotFoundError, KeyError):  # no manifest, or that of a dataset without a tokenizer (images, audio)
        pass
    fs, path = storage.resolve(storage.join(location, HF_TOKENIZER))
    try:
        found = fs.get_file_info(path).type == pafs.FileType.File
    except OSError as e:
        raise ConfigError(f"{field}: {storage.explain(location, e)}") from None
    if not found:
        raise ConfigError(f"{field}: '{location}' holds neither a prepared text dataset (manifest.json naming a "
                          f"tokenizer) nor a Hugging Face tokenizer ({HF_TOKENIZER}, as save_pretrained writes it, "
                          f"e.g. a model export runs/NAME/export); prepare that dataset first or name such a folder")
    return location


def shared_tokenizer(location: str) -> PreTrainedTokenizerBase:
    """The tokenizer of another prepared dataset, so mixed text sources share one vocabulary, or of a Hugging Face
    folder, so data for a model continued from it matches its vocabulary."""
    from transformers import AutoTokenizer

    field = "data.prepare.tokenizer"
    folder = tokenizer_folder(location, field)
    if "://" not in folder:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            fs, path = storage.resolve(folder)
            for info in fs.get_file_info(pafs.FileSelector(path)):
                # Tokenizer files only: an export folder also holds the model's weights, perhaps gigabytes.
                if info.type == pafs.FileType.File and not info.base_name.endswith(WEIGHTS):
                    storage.copy_tree(storage.join(folder, info.base_name), f"{tmp}/{info.base_name}")
            tok = AutoTokenizer.from_pretrained(tmp)
    if not tok.is_fast:  # the manifest's tokenizer_sha256 is that of the fast tokenizer's tokenizer.json
        raise ConfigError(f"{field}: '{location}' loads only as a slow tokenizer; raypt needs a fast one "
                          f"(tokenizer.json)")
    if tok.eos_token_id is None:
        raise ConfigError(f"{field}: the tokenizer of '{location}' has no eos_token, which separates the packed "
                          f"documents; set one in its {HF_TOKENIZER}")
    return tok
