"""Contrastive pre-training on two augmented views of each image: AMCL (Wang et al., ECCV 2024: C projection heads,
pair-wise temperatures from a shared network, the Omega regulariser) and SimCLR, its one-head fixed-temperature
case. Negatives come from every data-parallel rank (raypt/contrastive/loss.py); the encoder is a ViT
(raypt/contrastive/model.py says why); every evaluation adds a linear probe and a k-NN accuracy on the labelled
splits (raypt/contrastive/probe.py)."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Optional

from pydantic import Field, model_validator

from raypt.metrics import Metric
from raypt.tasks.base import Task, TaskConfig, register
from raypt.tasks.vit import recompute_flops, save_image_processor, transformer_flops

if TYPE_CHECKING:
    from torch import Tensor, nn
    from transformers import ViTConfig


class ContrastiveConfig(TaskConfig):
    """The encoder's sizes are TaskConfig's; the heads, temperatures and negatives are AMCL's (defaults: the
    reference train.py's for SimCLR-AMCL, research/algorithms.md C)."""
    task: Literal["contrastive"] = "contrastive"
    patch_size: int = Field(4, ge=1, description="side in pixels of the ViT's square patches; data.image.size must "
                            "be a multiple")
    heads: int = Field(3, ge=1, description="projection heads C, of one architecture with independent weights; "
                       "their losses are summed (SimCLR: 1)")
    proj_hidden: Optional[int] = Field(None, ge=8, description="width of each head's hidden layer; None = "
                                       "model.hidden_size")
    proj_dim: int = Field(128, ge=2, description="d': width of each head's output, where similarities are "
                          "cosines; also the d of Omega(t) = d/2 ln t + 1/t")
    temperature: Literal["adaptive", "fixed"] = Field("adaptive", description="adaptive = AMCL's pair-wise "
                                                      "temperatures from a network shared by the heads; fixed = "
                                                      "model.tau for every pair (SimCLR)")
    tau: float = Field(0.5, gt=0, description="fixed: the one temperature (SimCLR's reference baseline: 0.5)")
    tau_min: float = Field(1e-5, gt=0, description="adaptive: temperatures lie in (tau_min, tau_max)")
    tau_max: float = Field(2.0, gt=0, description="adaptive: the upper bound of the temperatures")
    phi_hidden: int = Field(128, ge=1, description="adaptive: hidden width of the temperature network phi "
                            "(d' -> phi_hidden -> d')")
    beta: float = Field(1e-4, ge=0, description="adaptive: weight of the Omega regulariser (none with a fixed "
                        "temperature)")
    negatives: Literal["topk_mean", "logsumexp"] = Field(
        "topk_mean", description="how an anchor's negatives enter its loss: topk_mean = the mean of s/t over the "
        "topk most similar (the paper's practical form), logsumexp = InfoNCE's log-sum-exp over all (SimCLR)")
    topk: int = Field(100, ge=1, description="topk_mean: negatives per anchor (at most the 2N - 2 there are)")
    knn_k: int = Field(20, ge=1, description="neighbours of the k-NN accuracy at each evaluation")

    @model_validator(mode="after")
    def _bounds(self) -> "ContrastiveConfig":
        if self.tau_min >= self.tau_max:
            raise ValueError(f"model.tau_min: {self.tau_min} must be below model.tau_max ({self.tau_max})")
        return self

    def check_job(self, job: Any) -> None:
        image, train = job.data.image, job.train
        if image.views != 2:
            raise ValueError(f"data.image.views: got {image.views}; model.task contrastive learns from two "
                             "augmented views of each image: set data.image.views=2")
        if image.size % self.patch_size:
            raise ValueError(f"model.patch_size: {self.patch_size} does not divide data.image.size ({image.size})")
        share = math.ceil(train.global_batch / min(job.scaling.world_sizes()))
        if train.micro_batch < share:
            raise ValueError(f"train.micro_batch: {train.micro_batch} is less than a rank's share of "
                             f"train.global_batch at the smallest world size ({share}); a step's negatives are the "
                             "rows of one micro-batch on every rank, so accumulated micro-batches would change "
                             f"the loss with the world size: use train.micro_batch >= {share}")


@register
class ContrastiveTask(Task):
    name = "contrastive"
    modalities = ("image",)
    Config = ContrastiveConfig

    def __init__(self, cfg, manifests: dict[str, dict]):
        super().__init__(cfg, manifests)
        m = cfg.model
        self.metrics = (
            *(Metric(f"loss_head{c}", "mean", f"contrastive loss of projection head {c}") for c in range(m.heads)),
            Metric("tau_pos_mean", "mean", "mean temperature of the positive pairs"),
            Metric("tau_pos_std", "mean", "spread (std) of the positive pairs' temperatures, averaged over ranks"),
            Metric("tau_neg_mean", "mean", "mean temperature of the negatives the loss uses"),
            Metric("tau_neg_std", "mean", "spread (std) of the negatives' temperatures, averaged over ranks"),
            Metric("omega", "mean", "the regulariser Omega(t_pos) - sum of the negatives' terms, before beta"),
        )

    def vit_config(self) -> ViTConfig:
        from transformers import ViTConfig

        m = self.cfg.model
        return ViTConfig(image_size=self.cfg.data.image.size, patch_size=m.patch_size, hidden_size=m.hidden_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         intermediate_size=m.intermediate_size or 4 * m.hidden_size, initializer_range=m.init_std)

    def construct(self) -> nn.Module:
        from raypt.contrastive import TemperatureNet
        from raypt.contrastive.model import ContrastiveModel

        m = self.cfg.model
        temperature = (TemperatureNet(m.proj_dim, m.phi_hidden, m.tau_min, m.tau_max)
                       if m.temperature == "adaptive" else m.tau)
        return ContrastiveModel(self.vit_config(), m.heads, m.proj_hidden or m.hidden_size, m.proj_dim,
                                temperature, m.beta, m.negatives, m.topk)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        pixels = batch["pixel_values"]  # [rows, 2, 3, S, S]
        return model(pixel_values=pixels.to(model.dtype))

    def hooks(self) -> tuple:
        from raypt.contrastive.probe import Probe

        return (Probe(self.cfg.model.knn_k),)

    def tokens_per_sample(self, modality: str) -> int:
        """Both views' patches."""
        return 2 * (self.cfg.data.image.size // self.cfg.model.patch_size) ** 2

    def flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """Two views through the encoder (patches + CLS) and every head; the pair-wise part (temperatures and
        similarities against the 2N columns) grows with the batch and is left out, as attention's cross-sample
        cost would be."""
        m, patches = self.cfg.model, (self.cfg.data.image.size // self.cfg.model.patch_size) ** 2
        inter, proj_hidden = m.intermediate_size or 4 * m.hidden_size, m.proj_hidden or m.hidden_size
        encoder = transformer_flops(m.hidden_size, m.num_layers, inter, patches + 1)
        embed = 6 * patches * 3 * m.patch_size ** 2 * m.hidden_size
        heads = 6 * m.heads * (m.hidden_size * proj_hidden + proj_hidden * m.proj_dim)
        return float(2 * (encoder + embed + heads))

    def recompute_flops_per_sample(self, model: nn.Module, modality: str) -> float:
        """Both views' encoder blocks, forward once more (raypt.tasks.vit.recompute_flops)."""
        m, patches = self.cfg.model, (self.cfg.data.image.size // self.cfg.model.patch_size) ** 2
        return 2 * recompute_flops(m.hidden_size, m.num_layers, m.intermediate_size or 4 * m.hidden_size, patches + 1)

    def export(self, model: nn.Module, out_dir: str) -> None:
        """The encoder alone, as a folder that `AutoModel.from_pretrained` (a ViTModel) and
        `AutoImageProcessor.from_pretrained` load offline; its features are `last_hidden_state.mean(1)`. The
        heads and the temperature network serve the loss only and are left out (the checkpoint keeps them)."""
        model.encoder.save_pretrained(out_dir, safe_serialization=True)
        save_image_processor(self.cfg.data.image, out_dir)
