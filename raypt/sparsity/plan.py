"""When a run prunes and how far, and the running mean parameter count N_avg (algorithms.md B.3): pure functions of
the step and global tokens, so a restart at any world size prunes at the same steps to the same counts."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from raypt.sparsity.config import SparsityConfig


def target_keep(cfg: SparsityConfig, size: int, tokens: float, total_tokens: float) -> int:
    """How many of `size` prunable weights survive the schedule's sparsity at `tokens`."""
    return round((1 - cfg.schedule.value(tokens, total_tokens, cfg.final)) * size)


def read_at(step: int, steps: int, tokens: float, total_tokens: float) -> float:
    """The tokens the schedule is read at before `step`, which starts at `tokens`: the run's end before its last
    step. A window that ends with the run (end 1.0) thus reaches the final sparsity, at the last step, as the
    paper's last event falls on the window's last step; read at its start, it would stop one event short."""
    return total_tokens if step == steps else tokens


def due(cfg: SparsityConfig, step: int, tokens: float, total_tokens: float) -> bool:
    """Whether pruning runs before `step`, which starts at `tokens`: every `every` steps inside the window, and at
    each step past its end (a no-op once the final sparsity is reached: the counts already match)."""
    if cfg.final == 0:
        return False
    first, last = cfg.schedule.window(total_tokens)
    return tokens >= last or (tokens >= first and (step - 1) % cfg.every == 0)


@dataclass
class RunningMean:
    """Sum_t N_t D_t / Sum_t D_t over the steps so far (N_t: non-zero parameters in step t, D_t: its tokens), in
    integers: a resumed run continues it exactly."""
    weighted: int = 0
    tokens: int = 0

    def add(self, nonzero: int, tokens: int) -> None:
        self.weighted += nonzero * tokens
        self.tokens += tokens

    @property
    def value(self) -> float:
        return self.weighted / self.tokens if self.tokens else 0.0

    def state(self) -> dict:
        return asdict(self)
