"""The AMCL / SimCLR loss math (raypt.contrastive.loss) against hand-written references, at the temperature bounds,
under gradcheck, and split over a 2-process gloo group against one process. No Ray."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gloo import run_group
from raypt.contrastive import TemperatureNet, amcl_loss, simclr_loss

ROWS, HEADS, DIM, BETA, TOPK = 5, 3, 8, 1e-2, 3
SPLITS = [(3, 2), (2, 3), (5, 0)]  # rows of rank 0 and rank 1; the last leaves rank 1 with none (a filler)


def case(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, TemperatureNet]:
    """Two views' per-head embeddings of ROWS rows and a temperature net, the same in every process."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(2, ROWS, HEADS, DIM, dtype=dtype)
    return z1, z2, TemperatureNet(DIM, hidden=16, tau_min=0.1, tau_max=2.0).to(dtype)


@torch.no_grad()
def reference(z1, z2, net: TemperatureNet, beta: float, neg_agg: str, k: int) -> tuple[float, list[float]]:
    """The loss anchor by anchor and pair by pair, in float64, straight from research/algorithms.md C.2."""
    net = copy.deepcopy(net).double()
    rows, heads, dim = z1.shape
    per_head = []
    for c in range(heads):
        views = [F.normalize(z[:, c].double(), dim=-1) for z in (z1, z2)]
        columns = views[0].unbind() + views[1].unbind()
        total = 0.0
        for v in (0, 1):
            for i in range(rows):
                a, me, pos = views[v][i], v * rows + i, (1 - v) * rows + i

                def tau(b):
                    score = net.phi(a) @ net.phi(b)
                    return net.tau_min + (net.tau_max - net.tau_min) / (1 + torch.exp(score))

                s_p, t_p = a @ columns[pos], tau(columns[pos])
                negs = [j for j in range(2 * rows) if j not in (me, pos)]
                if neg_agg == "topk_mean":
                    negs = sorted(negs, key=lambda j: float(a @ columns[j]), reverse=True)[:k]
                    agg = sum(a @ columns[j] / tau(columns[j]) for j in negs) / len(negs)
                else:
                    agg = torch.log(torch.exp(s_p / t_p) + sum(torch.exp(a @ columns[j] / tau(columns[j]))
                                                               for j in negs))
                reg = 0.5 * dim * torch.log(t_p) + 1 / t_p - sum(torch.log(tau(columns[j])) + 1 / tau(columns[j])
                                                                  for j in negs)
                total += float(-s_p / t_p + agg + beta * reg)
        per_head.append(total / (2 * rows))
    return sum(per_head), per_head


@pytest.mark.parametrize("neg_agg", ["topk_mean", "logsumexp"])
@pytest.mark.parametrize("bound", ["tau_min", "tau_max"])
def test_loss_and_gradients_finite_at_the_temperature_bounds(neg_agg, bound):
    """A saturated phi puts every t on a bound (1/t = 1e5 at the paper's t_min = 1e-5): still finite."""
    class Hot(TemperatureNet):  # t -> t_min + t_max - t: the same net, mirrored onto the upper bound
        def forward(self, a, b, dtype=torch.float32):
            return self.tau_min + self.tau_max - super().forward(a, b, dtype)

    net = (TemperatureNet if bound == "tau_min" else Hot)(DIM, hidden=16)
    with torch.no_grad():  # phi(z) = a constant of norm 100: every score 1e4, the sigmoid saturated
        net.phi[2].weight.zero_()
        net.phi[2].bias.fill_(100 / DIM ** 0.5)
    z1, z2 = (torch.randn(ROWS, HEADS, DIM, requires_grad=True) for _ in range(2))
    loss, diag = amcl_loss(z1, z2, net, beta=1e-4, neg_agg=neg_agg, topk=TOPK)
    loss.backward()
    expect = net.tau_min if bound == "tau_min" else net.tau_max
    for key in ("tau_pos_mean", "tau_neg_mean"):
        assert diag[key].item() == pytest.approx(expect, rel=1e-3)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in diag.values())
    for grad in [z1.grad, z2.grad] + [p.grad for p in net.parameters()]:
        assert grad is not None and torch.isfinite(grad).all()


@pytest.mark.parametrize("neg_agg", ["topk_mean", "logsumexp"])
def test_vectorised_loss_equals_the_per_anchor_loop(neg_agg):
    z1, z2, net = case()
    loss, diag = amcl_loss(z1, z2, net, beta=BETA, neg_agg=neg_agg, topk=TOPK)
    want, per_head = reference(z1, z2, net, BETA, neg_agg, TOPK)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want, abs=1e-6)
    for c in range(HEADS):
        assert diag[f"loss_head{c}"].item() == pytest.approx(per_head[c], abs=1e-6)


def test_simclr_is_nt_xent():
    z1, z2, _ = case()
    z1, z2 = z1[:, 0].to(torch.bfloat16), z2[:, 0].to(torch.bfloat16)  # a bf16 model's output: the loss is float32
    a, b = F.normalize(z1.float(), dim=-1), F.normalize(z2.float(), dim=-1)
    logits = torch.cat([a, b]) @ torch.cat([a, b]).T / 0.5
    logits.fill_diagonal_(float("-inf"))
    want = F.cross_entropy(logits, (torch.arange(2 * ROWS) + ROWS) % (2 * ROWS))
    loss, diag = simclr_loss(z1, z2, temperature=0.5)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(want.item(), abs=1e-6)
    assert diag["tau_pos_mean"].item() == pytest.approx(0.5) and diag["tau_neg_std"].item() == 0


@pytest.mark.parametrize("neg_agg", ["topk_mean", "logsumexp"])
def test_gradcheck_float64(neg_agg):
    """Gradients w.r.t. both views and phi's weights against finite differences."""
    torch.manual_seed(1)
    net = TemperatureNet(4, hidden=5, tau_min=0.1, tau_max=2.0).double()
    z1, z2 = (torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))

    def loss(z1, z2, *params):  # gradcheck perturbs phi's own parameters in place, so the net sees them
        return amcl_loss(z1, z2, net, beta=0.1, neg_agg=neg_agg, topk=2, dtype=torch.float64)[0]

    assert torch.autograd.gradcheck(loss, (z1, z2, *net.parameters()))


def split_over_ranks(rank: int, world: int, out_dir: str, splits: list) -> list:
    """Each split's loss of this rank's rows, weighted by rows / total as a trainer weights it, its diagnostics
    likewise, and the gradients of the weighted loss w.r.t. this rank's embeddings and phi's weights."""
    results = []
    for neg_agg in ("topk_mean", "logsumexp"):
        for split in splits:
            z1, z2, net = case()
            start, rows = sum(split[:rank]), split[rank]
            mine = [z[start:start + rows].clone().requires_grad_() for z in (z1, z2)]
            loss, diag = amcl_loss(*mine, net, beta=BETA, neg_agg=neg_agg, topk=TOPK)
            share = rows / ROWS
            (loss * share).backward()
            results.append({"loss": loss.item() * share, "diag": {k: v.item() * share for k, v in diag.items()},
                            "z": [z.grad.tolist() for z in mine], "phi": [p.grad.tolist() for p in net.parameters()]})
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list:
    return run_group(2, split_over_ranks, str(tmp_path_factory.mktemp("contrastive")), splits=SPLITS)


@pytest.mark.parametrize("neg_agg", ["topk_mean", "logsumexp"])
@pytest.mark.parametrize("split", SPLITS, ids=lambda s: "+".join(map(str, s)))
def test_two_ranks_equal_one_process(ranks, neg_agg, split):
    """Negatives gathered across ranks: the rows-weighted per-rank losses and their gradients add up to the
    one-process loss and gradients of the whole batch, equal split or not, with or without rows on a rank."""
    z1, z2, net = case()
    z1.requires_grad_(), z2.requires_grad_()
    loss, diag = amcl_loss(z1, z2, net, beta=BETA, neg_agg=neg_agg, topk=TOPK)
    loss.backward()
    got = [r[["topk_mean", "logsumexp"].index(neg_agg) * len(SPLITS) + SPLITS.index(split)] for r in ranks]
    assert sum(r["loss"] for r in got) == pytest.approx(loss.item(), abs=1e-6)
    for key in ("loss_head0", "loss_head1", "loss_head2", "omega", "tau_pos_mean"):
        # relative too: omega sums every negative's term under logsumexp, ~20, past float32's absolute 1e-6
        assert sum(r["diag"][key] for r in got) == pytest.approx(diag[key].item(), rel=1e-6, abs=1e-6)
    for view, z in enumerate((z1, z2)):
        joined = torch.cat([torch.tensor(r["z"][view]).reshape(-1, HEADS, DIM) for r in got])
        torch.testing.assert_close(joined, z.grad, atol=1e-6, rtol=0)
    for i, p in enumerate(net.parameters()):
        torch.testing.assert_close(sum(torch.tensor(r["phi"][i]) for r in got), p.grad, atol=1e-6, rtol=0)
