"""The loss of Adaptive Multi-head Contrastive Learning (AMCL; Wang, Koniusz, Gedeon, Zheng, ECCV 2024) and of
SimCLR, which is its one-head, fixed-temperature case: one code path, in float32 whatever the model runs in.

Layout: z1, z2 are [rows, C heads, d] projections of two views of this rank's rows. Every anchor (a row of either
view) is contrasted with the columns: both views of every rank's rows, gathered with gradients. Anchor a of view 1
has its positive in view 2 (and vice versa); its negatives are the 2N - 2 columns left (N rows over all ranks).

Per head c and anchor a (names of research/algorithms.md C.2, the official `amcl/losses.py`):
    l_c(a) = -s_ap/t_ap + NEG(a) + beta * [Omega(t_ap) - sum_{n in K_a} (ln t_an + 1/t_an)],  Omega(t) = d/2 ln t + 1/t
    topk_mean (the paper's practical Eq. 5): K_a = the k negatives of highest s, NEG = mean_{K_a} s_an/t_an.
    logsumexp (the un-approximated form, InfoNCE-style): K_a = every negative, NEG = log sum_{j != a} exp(s_aj/t_aj),
        the positive in the sum as in NT-Xent; so one head, a fixed t and beta = 0 is exactly SimCLR's NT-Xent.
    loss = sum_c 1/2 [mean_a l_c(view 1 -> 2) + mean_a l_c(view 2 -> 1)]  (heads summed, directions averaged).

Ranks: the loss a rank returns is the mean over its own anchors only. With n_r rows on rank r of N in all,
sum_r loss_r * n_r / N is the 1-worker loss of the N rows, and backpropagating each rank's loss_r * n_r * W / N
and averaging the gradients over the W ranks (what raypt's engines do with `Split.weight`, one micro-batch a step)
gives the 1-worker gradients exactly: the gather's backward returns every rank's share to the rows' owner.
The per-head losses, omega and the temperature means combine the same way (the stds only roughly). Negatives are
the rows of one call (one micro-batch on every rank): accumulated micro-batches do not see each other. A rank whose
micro-batch is a weight-0 filler passes zero rows, so the filler is nobody's negative; it still joins the gather
and its backward, as every rank must.
"""
from __future__ import annotations

from typing import Literal, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

NegAgg = Literal["topk_mean", "logsumexp"]


class TemperatureNet(nn.Module):
    """phi (Linear-ReLU-Linear, d -> hidden -> d), shared by all heads: t(a, b) = t_min + (t_max - t_min) *
    sigmoid(-phi(a).phi(b)), the paper's Eq. 3 sigma(r) = iota / (1 + e^r) + eta. Similar pairs (a high score) get
    a low t. The interval is open in exact arithmetic; in float a saturated sigmoid can round t onto a bound, where
    the loss stays finite since t_min > 0."""

    def __init__(self, dim: int, hidden: int = 128, tau_min: float = 1e-5, tau_max: float = 2.0):
        super().__init__()
        if not 0 < tau_min < tau_max:
            raise ValueError(f"need 0 < tau_min ({tau_min}) < tau_max ({tau_max})")
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.phi = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, a: Tensor, b: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """t of every pair of rows of a [..., n, d] and b [..., m, d]: [..., n, m]. phi runs in its weights' dtype
        (bf16 when DeepSpeed casts the model); the score and all after it in `dtype`, since 1/t reaches 1/t_min."""
        weights = self.phi[0].weight.dtype
        pa, pb = self.phi(a.to(weights)).to(dtype), self.phi(b.to(weights)).to(dtype)
        return self.tau_min + (self.tau_max - self.tau_min) * torch.sigmoid(-pa @ pb.transpose(-1, -2))


def omega(tau: Tensor, dim: int) -> Tensor:
    """The regulariser Omega(t) = d/2 ln t + 1/t of the MLE normaliser (d: the projection width)."""
    return 0.5 * dim * torch.log(tau) + 1.0 / tau


def gather_columns(x: Tensor) -> tuple[Tensor, int]:
    """Every rank's rows of x (dim 0), in rank order, with gradients (the backward sums each rank's gradient into
    the rows' owner), and the index of this rank's first row among them. Identity without a group of 2+ ranks.
    Ranks may hold different row counts, none included: rows are padded to the largest count for the gather, and
    a mask built from every rank's count drops the padding."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    world, rank = dist.get_world_size(), dist.get_rank()
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([x.shape[0]], device=x.device))  # on x's device: NCCL needs it there
    counts = torch.cat(counts)
    longest = int(counts.max())
    padded = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    real = torch.arange(longest, device=x.device) < counts[:, None]  # [world, longest]
    return torch.stack(all_gather(padded))[real], int(counts[:rank].sum())


def _mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Detached population mean and std, 0 for no values: a rank without rows reports finite metrics."""
    x, n = x.detach(), max(x.numel(), 1)
    mean = x.sum() / n
    return mean, (((x - mean) ** 2).sum() / n).sqrt()


def amcl_loss(z1: Tensor, z2: Tensor, temperature: Union[TemperatureNet, float], *, beta: float = 1e-4,
              neg_agg: NegAgg = "topk_mean", topk: int = 100,
              dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss of this rank's rows (z1, z2: [rows, C, d], any float dtype; rows may be 0) against every rank's, and
    detached diagnostics: loss_head<c>, tau_pos_mean/std, tau_neg_mean/std (over the negatives the loss uses) and
    omega (the beta-free regulariser, summed over heads like the loss). `temperature`: the shared network, or a
    fixed t (SimCLR). Defaults beta = 1e-4 and k = 100 are the reference train.py's. `dtype` is for tests
    (float64 gradcheck); the loss math runs in float32 otherwise."""
    if z1.shape != z2.shape or z1.ndim != 3:
        raise ValueError(f"z1, z2 must share a [rows, heads, dim] shape, not {tuple(z1.shape)}, {tuple(z2.shape)}")
    rows, heads, dim = z1.shape
    cols, first = gather_columns(torch.stack([z1, z2], 1))  # [N, 2, C, d]: one collective for both views
    total = cols.shape[0]
    if total < 2:
        raise ValueError("a contrastive loss needs at least 2 rows over all ranks (an anchor needs a negative)")
    # Head-major and L2-normalised: similarities are cosines; phi sees the normalised z, as in the official code.
    anchors = F.normalize(torch.cat([z1, z2]).to(dtype), dim=-1).transpose(0, 1)  # [C, 2n, d]
    columns = F.normalize(torch.cat([cols[:, 0], cols[:, 1]]).to(dtype), dim=-1).transpose(0, 1)  # [C, 2N, d]
    sim = anchors @ columns.transpose(-1, -2)  # [C, 2n, 2N]
    tau = (temperature(anchors, columns, dtype) if isinstance(temperature, TemperatureNet)
           else torch.full_like(sim, float(temperature)))

    own = first + torch.arange(rows, device=sim.device)
    self_col, pos_col = torch.cat([own, total + own]), torch.cat([total + own, own])  # view 1 anchors, then view 2
    at = torch.arange(2 * rows, device=sim.device)
    s_pos, t_pos = sim[:, at, pos_col], tau[:, at, pos_col]  # [C, 2n]
    is_self = torch.zeros_like(sim[0], dtype=torch.bool)
    is_self[at, self_col] = True
    is_neg = ~is_self
    is_neg[at, pos_col] = False
    # Negatives' regulariser as algorithms.md C.2 and the official code write it: ln t, not Omega's d/2 ln t.
    if neg_agg == "topk_mean":
        if topk < 1:
            raise ValueError(f"topk must be at least 1, not {topk}")
        # Selected by s, not s/t (official code); the -inf of self and positive are never among k <= 2N - 2.
        top, picked = sim.masked_fill(~is_neg, float("-inf")).topk(min(topk, 2 * total - 2), dim=-1)
        t_neg = tau.gather(-1, picked)
        neg, neg_reg = (top / t_neg).mean(-1), (torch.log(t_neg) + 1.0 / t_neg).sum(-1)
    elif neg_agg == "logsumexp":
        neg = torch.logsumexp((sim / tau).masked_fill(is_self, float("-inf")), dim=-1)
        # The regulariser over every negative: the selected set of Eq. 5 is then all of them.
        neg_reg = ((torch.log(tau) + 1.0 / tau) * is_neg).sum(-1)
        t_neg = tau[:, is_neg]
    else:
        raise ValueError(f"neg_agg must be topk_mean or logsumexp, not {neg_agg!r}")
    reg = omega(t_pos, dim) - neg_reg  # [C, 2n]
    # The mean over both views' anchors is the mean of the two directions (they have n anchors each).
    per_head = (-s_pos / t_pos + neg + beta * reg).sum(-1) / max(2 * rows, 1)
    (pos_mean, pos_std), (neg_mean, neg_std) = _mean_std(t_pos), _mean_std(t_neg)
    return per_head.sum(), {
        **{f"loss_head{c}": per_head[c].detach() for c in range(heads)},
        "tau_pos_mean": pos_mean, "tau_pos_std": pos_std, "tau_neg_mean": neg_mean, "tau_neg_std": neg_std,
        "omega": (reg.detach().sum(-1) / max(2 * rows, 1)).sum(),
    }


def simclr_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5,
                dtype: torch.dtype = torch.float32) -> tuple[Tensor, dict[str, Tensor]]:
    """SimCLR's NT-Xent of z1, z2 ([rows, d]) at a fixed temperature (0.5: the reference SimCLR baseline's): the
    AMCL loss with one head, InfoNCE's log-sum-exp and no regulariser (a fixed t has nothing to regularise)."""
    return amcl_loss(z1[:, None], z2[:, None], temperature, beta=0.0, neg_agg="logsumexp", dtype=dtype)
