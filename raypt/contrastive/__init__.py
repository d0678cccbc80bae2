"""Contrastive pre-training losses: AMCL (adaptive multi-head, pair-wise temperatures) and SimCLR as its one-head,
fixed-temperature case, with negatives from every data-parallel rank. Pure torch: no Ray, no DeepSpeed."""
from __future__ import annotations

from raypt.contrastive.loss import NegAgg, TemperatureNet, amcl_loss, gather_columns, omega, simclr_loss

__all__ = ["NegAgg", "TemperatureNet", "amcl_loss", "gather_columns", "omega", "simclr_loss"]
