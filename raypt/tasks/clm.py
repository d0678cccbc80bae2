"""Causal language modelling with a Llama-family decoder (RMSNorm, RoPE, SwiGLU, SDPA) from transformers."""
from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from raypt.tasks import llama
from raypt.tasks.base import Task, TaskConfig, register

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import LlamaConfig


class ClmConfig(TaskConfig):
    """Next-token prediction on text with a Llama-family decoder."""
    task: Literal["clm"] = "clm"
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base: larger = slower-rotating positions, for "
                              "longer contexts")
    tie_embeddings: bool = Field(False, description="share the input embedding and output projection matrices")


@register
class ClmTask(Task):
    name = "clm"
    modalities = ("text",)
    Config = ClmConfig
    pipelines = True

    def hf_config(self) -> LlamaConfig:
        """Sizes come from the job, vocabulary and context from the prepared dataset."""
        from transformers import LlamaConfig

        m, text = self.cfg.model, self.manifests["text"]
        eos = text["eos_id"]
        return LlamaConfig(
            vocab_size=text["vocab_size"], hidden_size=m.hidden_size, intermediate_size=llama.intermediate_size(m),
            num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
            num_key_value_heads=m.num_kv_heads or m.num_heads, max_position_embeddings=text["seq_len"],
            rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, initializer_range=m.init_std,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, attn_implementation="sdpa",
        )

    def construct(self) -> nn.Module:
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(self.hf_config())

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids = batch["input_ids"]
        return model(input_ids=ids, labels=ids).loss.float(), {}

    def pipeline_layers(self) -> list:
        from raypt.models.llama_pipe import layer_specs

        return layer_specs(self.hf_config())

    def row_losses(self, outputs: Tensor, batch: dict[str, Tensor]) -> Tensor:
        from raypt.models.llama_pipe import row_losses

        return row_losses(outputs, batch["input_ids"])

    def tokens_per_sample(self, modality: str) -> int:
        return self.manifests["text"]["seq_len"]

    def flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """Per sequence; the output projection is the only head (the input embedding is a lookup)."""
        hf = model.config
        return llama.training_flops(hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
                                    hf.num_key_value_heads, hf.intermediate_size, hf.hidden_size * hf.vocab_size,
                                    hf.max_position_embeddings)

    def recompute_flops_per_sample(self, model: nn.Module, modality: str) -> float:
        hf = model.config
        return llama.recompute_flops(hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads,
                                     hf.num_key_value_heads, hf.intermediate_size, hf.max_position_embeddings)

    def export(self, model: nn.Module, out_dir: str) -> None:
        """A Hugging Face folder (safetensors, config, tokenizer) that transformers loads without raypt."""
        from transformers import AutoTokenizer

        from raypt import storage

        model.save_pretrained(out_dir, safe_serialization=True)
        text = self.manifests["text"]
        with tempfile.TemporaryDirectory() as tmp:
            storage.copy_tree(storage.join(text["root"], text["tokenizer"]), tmp)
            AutoTokenizer.from_pretrained(tmp).save_pretrained(out_dir)
