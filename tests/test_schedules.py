"""Schedules: hand-computed values at every phase boundary and mid-phase, continuity, and the exact floating-point
operations of the LR formula runs were trained with before the registry (bit-identical losses on resume)."""
import math

import pytest

from raypt import config
from raypt.schedules import SCHEDULES
from raypt.schedules.constant import Constant
from raypt.schedules.cosine import Cosine


def lr_before_registry(tokens: float, total_tokens: float, peak: float, name: str, warmup: float,
                       min_lr_ratio: float) -> float:
    """raypt/schedules/lr.py's lr_at as it was, operation for operation: the oracle for bit-identity."""
    warm = warmup * total_tokens
    if tokens < warm:
        return peak * tokens / warm
    if name == "constant":
        return peak
    low = min_lr_ratio * peak
    progress = min(1.0, (tokens - warm) / max(1.0, total_tokens - warm))
    return low + 0.5 * (peak - low) * (1 + math.cos(math.pi * progress))


def test_cosine_by_hand_at_each_boundary_and_mid_phase():
    s = Cosine(warmup=0.1, min_lr_ratio=0.1)  # 1000 tokens: warmup ends at 100, decay 100 -> 1000, peak 2
    assert s.value(0, 1000, 2.0) == 0.0
    assert s.value(50, 1000, 2.0) == 1.0  # mid-warmup: 2 x 50 / 100
    assert s.value(99, 1000, 2.0) == pytest.approx(1.98)
    assert s.value(100, 1000, 2.0) == pytest.approx(2.0)  # end of warmup: the peak
    assert s.value(325, 1000, 2.0) == pytest.approx(0.2 + 0.9 * (1 + math.cos(math.pi / 4)))  # a quarter down
    assert s.value(550, 1000, 2.0) == pytest.approx(1.1)  # halfway down: (peak + low) / 2
    assert s.value(1000, 1000, 2.0) == pytest.approx(0.2)  # the last token: min_lr_ratio x peak
    assert s.value(1500, 1000, 2.0) == pytest.approx(0.2)  # past the end (a run given more steps): held


def test_cosine_is_continuous_and_monotone_in_each_phase():
    s = Cosine(warmup=0.1, min_lr_ratio=0.1)
    assert s.value(100 - 1e-9, 1000, 1.0) == pytest.approx(s.value(100, 1000, 1.0), abs=1e-9)
    warm = [s.value(t, 1000, 1.0) for t in range(0, 101, 10)]
    decay = [s.value(t, 1000, 1.0) for t in range(100, 1001, 50)]
    assert warm == sorted(warm) and decay == sorted(decay, reverse=True)


def test_cosine_without_warmup_or_decay():
    assert Cosine(warmup=0.0).value(0, 1000, 3.0) == pytest.approx(3.0)  # starts at the peak
    flat = Cosine(warmup=0.0, min_lr_ratio=1.0)
    assert {flat.value(t, 1000, 3.0) for t in (0, 400, 1000)} == {3.0}


def test_constant_by_hand():
    s = Constant(warmup=0.5)
    assert s.value(0, 100, 2.0) == 0.0
    assert s.value(10, 100, 2.0) == 0.4
    assert s.value(49, 100, 2.0) == pytest.approx(1.96)
    assert s.value(50, 100, 2.0) == 2.0  # continuous: the ramp ends at the peak
    assert s.value(99, 100, 2.0) == 2.0


@pytest.mark.parametrize("name,warmup,ratio", [("cosine", 0.05, 0.1), ("cosine", 0.3, 0.0), ("cosine", 0.0, 0.5),
                                               ("constant", 0.05, 0.1), ("constant", 0.0, 0.1)])
def test_same_floats_as_before_the_registry(name, warmup, ratio):
    sched = SCHEDULES[name](warmup=warmup, **({"min_lr_ratio": ratio} if name == "cosine" else {}))
    total = 200 * 16 * 128.0
    for tokens in [0, 1, 2047, 2048, *range(0, int(total) + 4096, 4096 + 123), total - 1, total, total + 1]:
        assert sched.value(tokens, total, 3e-3) == lr_before_registry(tokens, total, 3e-3, name, warmup, ratio)


def test_the_job_picks_a_schedule_by_name():
    assert config.load(None, check_data=False).train.schedule == Cosine(warmup=0.05, min_lr_ratio=0.1)
    cfg = config.load(None, ["train.schedule.name=constant", "train.schedule.warmup=0.2"], check_data=False)
    assert cfg.train.schedule == Constant(warmup=0.2)
    assert config.from_dict(config.to_dict(cfg)).train.schedule == Constant(warmup=0.2)
    assert config.load(None, ["train.schedule=constant"], check_data=False).train.schedule == Constant()
    with pytest.raises(config.ConfigError, match=r"train.schedule.min_lr_ratio: not a field of train.schedule.name "
                                                 r"'constant' \(it is a field of 'cosine'\)"):
        config.load(None, ["train.schedule.name=constant", "train.schedule.min_lr_ratio=0.2"], check_data=False)
