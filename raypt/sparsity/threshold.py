"""Which weights a pruning event removes, found without gathering the model: each rank sees only its slices of the
fp32 masters. Per group of tensors (one group for a global threshold, one per tensor for per_layer), the `need`
smallest surviving magnitudes go, ties ordered by parameter name, then flat index, so the count is exact and the
same weights go whatever the world size.

Non-negative fp32 magnitudes order as their int32 bit patterns, so a bisection over the bits finds the exact
boundary magnitude in at most 32 rounds of one all-reduced count vector; a second round of counts places the ties
at the boundary."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

INF_BITS = 0x7F800000  # the bits of +inf: above every finite magnitude
GONE = 0x7FFFFFFF  # the bits given to weights already pruned: above every candidate, so never chosen again

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sum over the ranks that split the masters (identity if none do)


@dataclass(frozen=True)
class Slice:
    """One rank's candidates of one tensor: `bits` of |w| (GONE where already pruned) for full flat indices
    [start, start + len(bits)), in group `group`."""
    name: str
    group: int
    start: int
    bits: torch.Tensor


def magnitude_bits(master: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """|master| as ordered int32 bits, GONE where `kept` is False."""
    bits = master.detach().float().abs().contiguous().view(torch.int32)
    return torch.where(kept, bits, torch.full_like(bits, GONE))


def _group_sum(slices: list[Slice], groups: int, per_slice: Callable[[Slice], torch.Tensor], reduce: Reduce):
    out = torch.zeros(groups, dtype=torch.int64)
    for s in slices:
        out[s.group] += per_slice(s).to(torch.int64).cpu()
    return reduce(out)


def boundary(slices: list[Slice], need: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """Per group, the smallest bits b with at least need[g] candidates at or below b (INF_BITS where need is 0)."""
    lo = torch.full_like(need, -1)
    hi = torch.full_like(need, INF_BITS)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        count = _group_sum(slices, len(need), lambda s: (s.bits <= mid[s.group]).sum(), reduce)
        enough = count >= need
        hi, lo = torch.where(enough, mid, hi), torch.where(enough, lo, mid)
    return torch.where(need > 0, hi, torch.full_like(hi, -1))


def choose(slices: list[Slice], need: torch.Tensor, reduce: Reduce, rank: int, world: int) -> list[torch.Tensor]:
    """For each slice, which of its entries this event prunes: need[g] in all of group g, over every rank.
    `rank`/`world` place this rank's slices among the others' (0 and 1 where every rank holds every tensor)."""
    theta = boundary(slices, need, reduce)
    below = _group_sum(slices, len(need), lambda s: (s.bits < theta[s.group]).sum(), reduce)
    take = need - below  # how many of the ties at the boundary go, per group
    ties = [s.bits == theta[s.group] for s in slices]
    counts = torch.zeros(len(slices), world, dtype=torch.int64)
    starts = torch.zeros(len(slices), world, dtype=torch.int64)
    for i, (s, t) in enumerate(zip(slices, ties)):
        counts[i, rank], starts[i, rank] = int(t.sum()), s.start
    counts, starts = reduce(counts), reduce(starts)
    taken = torch.zeros_like(need)  # ties given out so far per group, in name order
    out = []
    for i in sorted(range(len(slices)), key=lambda i: slices[i].name):
        s = slices[i]
        earlier = int(counts[i][starts[i] < s.start].sum())  # this tensor's ties on ranks holding lower indices
        quota = max(0, min(int(counts[i, rank]), int(take[s.group] - taken[s.group]) - earlier))
        tie_cut = torch.cumsum(ties[i].to(torch.int64), 0) <= quota
        out.append((i, (s.bits < theta[s.group]) | (ties[i] & tie_cut)))
        taken[s.group] += int(counts[i].sum())
    return [mask for _, mask in sorted(out, key=lambda pair: pair[0])]
