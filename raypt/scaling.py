"""`raypt fit-scaling`: the average-parameter-count scaling law fitted to finished runs, L(N_avg) = E + A / N_avg^alpha
at one token budget, L(N_avg, D) = E + A / N_avg^alpha + B / D^beta across several (Hoffmann et al.'s Approach 3:
Huber loss on log residuals, L-BFGS from a grid of starts), with bootstrap intervals and a PNG of the fit."""
from __future__ import annotations

import itertools
import json
import re
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow.fs as pafs
import yaml
from scipy.optimize import minimize
from scipy.special import huber
from threadpoolctl import threadpool_limits

from raypt import storage
from raypt.config import ConfigError
from raypt.plot import pyplot, save_png, read_records, run_name

DELTA = 1e-3  # Hoffmann et al.'s Huber delta on log residuals: below it squared, above it absolute (robust)
SAME_BUDGET = 1.01  # runs whose token counts are within 1% of each other share a budget
# Starting points in the log-sum-exp parametrisation (e = log E, a = log A, b = log B): Hoffmann et al.'s grid.
# L-BFGS runs from the STARTS of them where the objective is lowest: from each of the 5,400 starts of the
# 5-constant grid it would take tens of seconds, and the screened-out ones start where the loss is far off the runs'.
E_STARTS = (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5)
LOG_STARTS = (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
EXP_STARTS = (0.0, 0.5, 1.0, 1.5, 2.0)
STARTS = 10
RESAMPLES, LEVEL = 200, 0.90


@dataclass(frozen=True)
class Point:
    """One finished run: its final metric, token-weighted average non-zero parameter count and tokens seen."""
    name: str
    loss: float
    n_avg: float
    tokens: float
    sparse: bool


@dataclass(frozen=True)
class Fit:
    """Constants (E, A, alpha and, across budgets, B, beta) with bootstrap intervals at LEVEL."""
    constants: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    budgets: int  # distinct token budgets among the points: 1 is the one-variable form
    resamples: int

    def predict(self, n_avg: np.ndarray, tokens: float | np.ndarray = np.inf) -> np.ndarray:
        c = self.constants
        loss = c["E"] + c["A"] / np.asarray(n_avg, dtype=float) ** c["alpha"]
        return loss + (c["B"] / np.asarray(tokens, dtype=float) ** c["beta"] if "B" in c else 0.0)

    def formula(self) -> str:
        c = self.constants
        text = f"L = {c['E']:.3g} + {c['A']:.4g} / N_avg^{c['alpha']:.3g}"
        return text + (f" + {c['B']:.4g} / D^{c['beta']:.3g}" if "B" in c else "")


def points(folders: list[str], metric: str = "val_loss", note: Callable[[str], None] | None = None) -> list[Point]:
    """The finished runs under `folders` (run folders, or sweep folders of trial-NNNNN runs; local or s3://).
    Unfinished runs (no summary.json) are skipped with a note (stderr by default)."""
    note = note or (lambda text: print(f"raypt: note: {text}", file=sys.stderr))
    found = []
    for folder in folders:
        for run in _runs(folder.rstrip("/")):
            if not _exists(storage.join(run, "summary.json")):
                note(f"skipped {run}: unfinished (no summary.json)")
                continue
            found.append(_point(run, metric))
    return found


def _exists(uri: str) -> bool:
    fs, path = storage.resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _runs(folder: str) -> list[str]:
    """A sweep folder's trial run folders, or the folder itself when it is a run."""
    if _exists(storage.join(folder, "sweep.yaml")):
        fs, path = storage.resolve(folder)
        return [storage.join(folder, i.base_name) for i in sorted(fs.get_file_info(pafs.FileSelector(path)),
                                                                   key=lambda i: i.base_name)
                if i.type == pafs.FileType.Directory and re.fullmatch(r"trial-\d+", i.base_name)]
    if _exists(storage.join(folder, "metrics.jsonl")):
        return [folder]
    raise ConfigError(f"fit-scaling: '{folder}' holds no runs; expected a run folder (metrics.jsonl) or a sweep "
                      f"folder (sweep.yaml and trial-NNNNN/)")


def _point(run: str, metric: str) -> Point:
    """A finished run's point: the last value of each key in metrics.jsonl, sparse or not from config.yaml."""
    records = read_records(run)

    def last(*keys: str) -> float:
        for key in keys:  # the first key any record has, from its last record
            values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
            if values:
                return float(values[-1])
        raise ConfigError(f"fit-scaling: run '{run}' reports no {' or '.join(keys)} in metrics.jsonl")

    # n_avg is the law's variable; a run from before it was reported has nonzero_params (N itself when dense)
    loss, n_avg, tokens = last(metric), last("n_avg", "nonzero_params"), last("tokens_seen")
    try:
        job = yaml.safe_load(storage.read_text(storage.join(run, "config.yaml"))) or {}
    except FileNotFoundError:
        raise ConfigError(f"fit-scaling: run '{run}' holds no config.yaml") from None
    sparse = float((job.get("sparsity") or {}).get("final") or 0) > 0  # no sparsity section: a dense run
    return Point(_label(run), loss, n_avg, tokens, sparse)


def _label(run: str) -> str:
    """A sweep trial by its variant when it has one (what the reader compares), else the run folder's name."""
    try:
        variant = json.loads(storage.read_text(storage.join(run, "values.json"))).get("variant")
    except FileNotFoundError:
        variant = None
    return f"{run_name(run)} {variant}" if variant else run_name(run)


def budgets(tokens: np.ndarray) -> list[float]:
    """The distinct token budgets: sorted token counts, a new budget wherever one is over 1% above the last's."""
    starts: list[float] = []
    for d in np.sort(tokens):
        if not starts or d > starts[-1] * SAME_BUDGET:
            starts.append(float(d))
    return starts


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray | None,
               log_loss: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum of Huber losses of log L_pred - log L_obs and its gradient, log L_pred = LSE(e, a - alpha log N
    [, b - beta log D]): the log-sum-exp form keeps E, A, B positive and the fit on the scale of log loss."""
    terms = [np.full_like(log_n, theta[0]), theta[1] - theta[2] * log_n]
    if log_d is not None:
        terms.append(theta[3] - theta[4] * log_d)
    terms = np.stack(terms)
    lse = np.logaddexp.reduce(terms, axis=0)  # scipy's logsumexp: the same, 10x slower on arrays this small
    residual = lse - log_loss
    w = np.exp(terms - lse)  # d LSE / d term (the softmax)
    grads = [w[0], w[1], -w[1] * log_n] + ([w[2], -w[2] * log_d] if log_d is not None else [])
    slope = np.clip(residual, -DELTA, DELTA)  # d huber(delta, r) / dr
    # in units of delta: gradients of order 1 per run, the scale L-BFGS-B's default tolerances are set for (with
    # the raw Huber loss they stop it ~1e-3 from the optimum, and bootstrap refits barely leave their start)
    return float(huber(DELTA, residual).sum()) / DELTA, np.stack(grads) @ slope / DELTA


def _minimise(starts: list[np.ndarray], log_n: np.ndarray, log_d: np.ndarray | None,
              log_loss: np.ndarray) -> np.ndarray:
    """The lowest L-BFGS-B optimum over the starts. Exponents are kept >= 0: a loss that grows with N or D is
    no scaling law, and a negative exponent only trades off against E where the runs span a narrow range."""
    bounds = [(None, None), (None, None), (0.0, None)] + ([(None, None), (0.0, None)] if log_d is not None else [])
    best = None
    for x0 in starts:
        result = minimize(_objective, x0, args=(log_n, log_d, log_loss), jac=True, method="L-BFGS-B",
                          bounds=bounds)
        if best is None or result.fun < best.fun:
            best = result
    return best.x


def fit(pts: list[Point], resamples: int = RESAMPLES, seed: int = 0) -> Fit:
    """Fit the law to the points: one budget (all token counts within 1%) gives the 3-constant form, several the
    5-constant one. Intervals: percentiles of refits on `resamples` bootstrap resamples of the runs."""
    log_n = np.log([p.n_avg for p in pts])
    log_loss = np.log([p.loss for p in pts])
    found = budgets(np.array([p.tokens for p in pts]))
    several = len(found) > 1
    log_d = np.log([p.tokens for p in pts]) if several else None
    names = ["E", "A", "alpha"] + (["B", "beta"] if several else [])
    if len(pts) < len(names):
        raise ConfigError(f"fit-scaling: {len(pts)} finished runs for {len(names)} constants "
                          f"({', '.join(names)}{', several token budgets' if several else ', one token budget'}); "
                          f"need at least {len(names)}")
    grid = [E_STARTS, LOG_STARTS, EXP_STARTS] + ([LOG_STARTS, EXP_STARTS] if several else [])
    grid = np.array(list(itertools.product(*grid)))
    screen = [_objective(x0, log_n, log_d, log_loss)[0] for x0 in grid]
    # L-BFGS-B's BLAS calls on 3x3 to 5x5 matrices: OpenBLAS threads only add hand-offs, which cost 10-30x the
    # whole fit on a machine whose cores are busy
    with threadpool_limits(limits=1, user_api="blas"):
        theta = _minimise(list(grid[np.argsort(screen)[:STARTS]]), log_n, log_d, log_loss)
        # Each resample starts from the full fit: its optimum is the full fit's, moved by the resampling, which is
        # what the interval measures. Resamples with fewer distinct runs than constants do not pin them down.
        rng = np.random.default_rng(seed)
        draws = []
        for _ in range(resamples):
            i = rng.integers(0, len(pts), len(pts))
            if len(np.unique(i)) >= len(names):
                draws.append(_minimise([theta], log_n[i], None if log_d is None else log_d[i], log_loss[i]))
    values = np.array([list(_constants(d).values()) for d in draws]).reshape(-1, len(names))
    low, high = (np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2], axis=0) if draws
                 else np.full((2, len(names)), np.nan))
    return Fit(_constants(theta), {k: (float(lo), float(hi)) for k, lo, hi in zip(names, low, high)},
               len(found), len(draws))


def _constants(theta: np.ndarray) -> dict[str, float]:
    c = {"E": np.exp(theta[0]), "A": np.exp(theta[1]), "alpha": theta[2]}
    if len(theta) == 5:
        c.update(B=np.exp(theta[3]), beta=theta[4])
    return {k: float(v) for k, v in c.items()}


def plot_fit(pts: list[Point], result: Fit, out: str, metric: str = "val_loss") -> str:
    """Loss against N_avg (log x) with the fitted curve, one per token budget; dense runs as circles, sparse as
    triangles, each labelled by its run name. Written to `out` (local or s3://); the path written."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    n = np.array([p.n_avg for p in pts])
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    tokens = budgets(np.array([p.tokens for p in pts]))
    for budget in tokens:
        ax.plot(grid, result.predict(grid, budget), label=f"fit, D = {budget:.3g}" if result.budgets > 1 else "fit")
    for sparse, marker, label in ((False, "o", "dense"), (True, "^", "sparse")):
        mine = [p for p in pts if p.sparse == sparse]
        if mine:
            ax.scatter([p.n_avg for p in mine], [p.loss for p in mine], marker=marker, color="k", zorder=3,
                       label=label)
        for p in mine:
            ax.annotate(p.name, (p.n_avg, p.loss), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("N_avg (token-weighted average non-zero parameters)")
    ax.set_ylabel(f"final {metric}")
    ax.set_title(result.formula() + (f" at D = {tokens[0]:.3g} tokens" if result.budgets == 1 else ""), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, out)
