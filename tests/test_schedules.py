"""Schedules: hand-computed values at every phase boundary and mid-phase, continuity, and the exact floating-point
operations of the LR formula runs were trained with before the registry (bit-identical losses on resume)."""
import math

import pytest

from raypt import config
from raypt.schedules import SCHEDULES
from raypt.schedules.constant import Constant
from raypt.schedules.cosine import Cosine
from raypt.schedules.infinite import Infinite
from raypt.schedules.inverse_sqrt import InverseSqrt
from raypt.schedules.linear import Linear
from raypt.schedules.one_minus_sqrt import OneMinusSqrt
from raypt.schedules.rewarm import Rewarm
from raypt.schedules.wsd import WSD


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
                                                 r"'constant' \(it is a field of 'cosine', 'linear'"):
        config.load(None, ["train.schedule.name=constant", "train.schedule.min_lr_ratio=0.2"], check_data=False)


def test_checkpoints_saved_before_the_new_fields_still_resume():
    """A trajectory saved before a schedule gained fields (here: warm-up in tokens and a start value) is read
    with their defaults, which compute what that run computed; a change to a field it had still counts."""
    from raypt.config import trajectory_diff

    cfg = config.load(None, check_data=False)
    old = cfg.trajectory()
    for added in ("warmup_tokens", "start_lr_ratio"):
        del old["train"]["schedule"][added]
    assert trajectory_diff(old, cfg.trajectory()) == []
    warmer = config.load(None, ["train.schedule.start_lr_ratio=0.1"], check_data=False)
    assert trajectory_diff(old, warmer.trajectory()) == ["train.schedule.start_lr_ratio"]
    other = config.load(None, ["train.schedule=constant"], check_data=False)
    assert "train.schedule.name" in trajectory_diff(old, other.trajectory())


def test_warmup_as_tokens_and_from_a_start_value():
    s = Constant(warmup=0.5, warmup_tokens=20)  # the token count wins over the share
    assert s.value(10, 100, 2.0) == 1.0 and s.value(20, 100, 2.0) == 2.0 and s.value(15, 10_000, 2.0) == 1.5
    r = Cosine(warmup=0.1, start_lr_ratio=0.25, min_lr_ratio=0.1)  # 1000 tokens, peak 2: 0.5 -> 2 over 100 tokens
    assert r.value(0, 1000, 2.0) == 0.5
    assert r.value(50, 1000, 2.0) == pytest.approx(1.25)
    assert r.value(100, 1000, 2.0) == pytest.approx(2.0)
    assert r.value(550, 1000, 2.0) == pytest.approx(1.1)  # the decay does not depend on where the warm-up began
    assert Cosine(warmup_tokens=0).value(0, 1000, 3.0) == 3.0


def test_linear_and_1_sqrt_by_hand():
    lin, sq = Linear(warmup=0.1, min_lr_ratio=0.1), OneMinusSqrt(warmup=0.1, min_lr_ratio=0.1)
    for s in (lin, sq):  # 1000 tokens, peak 2: same warm-up, same ends
        assert s.value(50, 1000, 2.0) == 1.0
        assert s.value(100, 1000, 2.0) == pytest.approx(2.0)
        assert s.value(1000, 1000, 2.0) == pytest.approx(0.2)
        assert s.value(1300, 1000, 2.0) == pytest.approx(0.2)
    assert lin.value(325, 1000, 2.0) == pytest.approx(0.2 + 1.8 * 0.75)  # a quarter of the way: 3/4 of the gap left
    assert lin.value(550, 1000, 2.0) == pytest.approx(1.1)
    assert sq.value(325, 1000, 2.0) == pytest.approx(0.2 + 1.8 * 0.5)  # sqrt(1/4) = 1/2 of the gap gone
    assert sq.value(676, 1000, 2.0) == pytest.approx(0.2 + 1.8 * 0.2)  # progress 0.64: sqrt = 0.8


def test_rewarm_by_hand():
    s = Rewarm()  # the paper's defaults: 1% warm-up from 0.1 x peak, cosine back down to 0.1 x peak
    assert s.value(0, 10_000, 1.0) == pytest.approx(0.1)  # where a previous run with the same peak ended
    assert s.value(50, 10_000, 1.0) == pytest.approx(0.55)
    assert s.value(100, 10_000, 1.0) == pytest.approx(1.0)
    assert s.value(5050, 10_000, 1.0) == pytest.approx(0.55)  # halfway down the cosine
    assert s.value(10_000, 10_000, 1.0) == pytest.approx(0.1)
    assert Rewarm(decay_shape="linear").value(2575, 10_000, 1.0) == pytest.approx(0.1 + 0.9 * 0.75)
    assert Rewarm(start_lr_ratio=0.0).value(25, 10_000, 2.0) == pytest.approx(0.5)  # from 0: an iteration restart


def test_wsd_by_hand():
    s = WSD(warmup=0.1, decay=0.2, decay_shape="linear")  # 1000 tokens, peak 2, down to 0 from 800
    assert [s.value(t, 1000, 2.0) for t in (0, 50)] == [0.0, 1.0]
    assert [s.value(t, 1000, 2.0) for t in (100, 500, 799.5, 800)] == [2.0] * 4  # the stable phase
    assert s.value(900, 1000, 2.0) == pytest.approx(1.0)
    assert s.value(1000, 1000, 2.0) == pytest.approx(0.0) and s.value(1200, 1000, 2.0) == pytest.approx(0.0)
    assert WSD(warmup=0.1, decay_shape="1-sqrt").value(850, 1000, 2.0) == pytest.approx(1.0)  # sqrt(1/4)
    assert WSD(warmup=0.1, decay_shape="cosine").value(900, 1000, 2.0) == pytest.approx(1.0)
    assert WSD(warmup=0.1, min_lr_ratio=0.1, decay_shape="linear").value(900, 1000, 2.0) == pytest.approx(1.1)
    by_tokens = WSD(warmup=0.1, decay_tokens=100, decay_shape="linear")  # the window is the last 100 tokens
    assert by_tokens.value(900, 1000, 2.0) == 2.0 and by_tokens.value(950, 1000, 2.0) == pytest.approx(1.0)
    assert by_tokens.value(1950, 2000, 2.0) == pytest.approx(1.0)  # a longer run: the window moves, keeps its length
    never = WSD(warmup=0.1, decay=0.0)
    assert never.value(1000, 1000, 2.0) == 2.0 and never.value(5000, 1000, 2.0) == 2.0
    overlap = WSD(warmup_tokens=600, decay_tokens=600, decay_shape="linear")  # the window starts after the warm-up
    assert overlap.value(600, 1000, 2.0) == 2.0 and overlap.value(800, 1000, 2.0) == pytest.approx(1.0)


def test_inverse_sqrt_with_cooldown_by_hand():
    s = InverseSqrt(warmup=0.1, timescale=0.1, decay=0.2, decay_shape="linear")  # 1000 tokens, peak 1
    assert s.value(50, 1000, 1.0) == 0.5
    assert s.value(100, 1000, 1.0) == 1.0
    assert s.value(400, 1000, 1.0) == pytest.approx(0.5)  # timescale = warm-up: Vaswani's sqrt(100 / 400)
    assert s.value(800, 1000, 1.0) == pytest.approx(1 / math.sqrt(8))  # the cooldown starts where rsqrt got to
    assert s.value(900, 1000, 1.0) == pytest.approx(0.5 / math.sqrt(8))
    assert s.value(1000, 1000, 1.0) == pytest.approx(0.0)
    assert InverseSqrt(warmup=0.1, timescale_tokens=300).value(400, 1000, 1.0) == pytest.approx(1 / math.sqrt(2))
    low = InverseSqrt(warmup=0.1, timescale=0.1, min_lr_ratio=0.1)
    assert low.value(1000, 1000, 1.0) == pytest.approx(0.1)


def test_infinite_by_hand():
    s = Infinite(warmup=0.1, cooldown=0.2, const_lr_ratio=0.5, min_lr_ratio=0.1)  # 1000 tokens, peak 2
    assert [s.value(t, 1000, 2.0) for t in (0, 50)] == [0.0, 1.0]
    assert s.value(100, 1000, 2.0) == 2.0
    assert s.value(200, 1000, 2.0) == pytest.approx(1.5)  # halfway down the cosine to the constant 1
    assert [s.value(t, 1000, 2.0) for t in (300, 1000, 50_000)] == [1.0] * 3  # budget-free: the constant stays
    inv = Infinite(warmup=0.1, cooldown=0.2, const_lr_ratio=0.5, cooldown_shape="inverse-sqrt", cooldown_alpha=8)
    # u = 3/8: h(u) = 1/sqrt(4) - 1 = -1/2, h(1) = 1/3 - 1 = -2/3, so 3/4 of the way from 2 to 1
    assert inv.value(175, 1000, 2.0) == pytest.approx(1.25)
    assert inv.value(300, 1000, 2.0) == 1.0
    at_constant = Infinite(warmup=0.0, cooldown=0.0, const_lr_ratio=0.5)  # a continued run: straight in
    assert at_constant.value(0, 1000, 2.0) == 1.0 and at_constant.value(999, 1000, 2.0) == 1.0
    by_tokens = Infinite(warmup_tokens=10, cooldown_tokens=20, const_lr_ratio=0.5)
    assert by_tokens.value(20, 10**9, 2.0) == pytest.approx(1.5) and by_tokens.value(30, 10**9, 2.0) == 1.0


def test_infinite_anneal_branch_by_hand():
    main = Infinite(warmup=0.1, cooldown=0.2, const_lr_ratio=0.5, min_lr_ratio=0.1)
    branch = main.model_copy(update={"anneal_start_tokens": 400, "anneal_tokens": 100})
    assert all(branch.value(t, 1000, 2.0) == main.value(t, 1000, 2.0) for t in range(0, 400, 7))  # same curve
    assert branch.value(400, 1000, 2.0) == 1.0  # the constant, where the branch leaves the main run
    assert branch.value(450, 1000, 2.0) == pytest.approx(math.sqrt(0.2))  # 1 x (0.2 / 1)^(1/2)
    assert branch.value(500, 1000, 2.0) == pytest.approx(0.2)  # min_lr_ratio x peak at the end of the anneal
    assert branch.value(700, 1000, 2.0) == pytest.approx(0.2)
    assert main.value(450, 1000, 2.0) == 1.0  # the main run is untouched: resumable at its constant phase
    early = main.model_copy(update={"anneal_start_tokens": 200, "anneal_tokens": 100})  # off the cooldown: from 1.5
    assert early.value(250, 1000, 2.0) == pytest.approx(1.5 * math.sqrt(0.2 / 1.5))


# Each schedule with the tokens where its formula changes (1000 tokens): the value is continuous there.
BOUNDARIES = [
    (Cosine(warmup=0.1, start_lr_ratio=0.3), [100]),
    (Linear(warmup=0.1), [100, 1000]),
    (OneMinusSqrt(warmup=0.1), [100, 1000]),
    (Rewarm(warmup=0.1), [100, 1000]),
    *[(WSD(warmup=0.1, decay=0.3, decay_shape=shape), [100, 700, 1000]) for shape in ("cosine", "linear", "1-sqrt")],
    (WSD(warmup_tokens=600, decay_tokens=600), [600, 1000]),
    (InverseSqrt(warmup=0.1, decay=0.3, min_lr_ratio=0.05), [100, 700, 1000]),
    *[(Infinite(warmup=0.1, cooldown=0.3, cooldown_shape=shape, anneal_start_tokens=600, anneal_tokens=200),
       [100, 400, 600, 800]) for shape in ("cosine", "inverse-sqrt")],
    (Infinite(warmup=0.1, cooldown=0.3, anneal_start_tokens=250, anneal_tokens=200), [100, 250, 450]),
]


@pytest.mark.parametrize("schedule,boundaries", BOUNDARIES, ids=[f"{s.name}-{i}" for i, (s, _) in
                                                                  enumerate(BOUNDARIES)])
def test_continuous_at_every_boundary(schedule, boundaries):
    for b in boundaries:
        at = schedule.value(b, 1000, 1.0)
        # Left and right limits: closer tokens, closer values (1-sqrt's slope is infinite at 0, hence no fixed eps).
        for eps, close in ((1e-6, 1e-4), (1e-10, 1e-6)):
            assert schedule.value(b - eps, 1000, 1.0) == pytest.approx(at, abs=close)
            assert schedule.value(b + eps, 1000, 1.0) == pytest.approx(at, abs=close)


@pytest.mark.parametrize("override", [
    "{name: linear, warmup_tokens: 100, min_lr_ratio: 0}", "{name: 1-sqrt}", "{name: rewarm, decay_shape: linear}",
    "{name: wsd, decay_tokens: 5000, decay_shape: cosine}", "{name: inverse-sqrt, timescale_tokens: 1e6}",
    "{name: infinite, cooldown_shape: inverse-sqrt, anneal_start_tokens: 1e6, anneal_tokens: 2e5}"])
def test_each_schedule_from_the_job_survives_a_restart(override):
    """A restart rebuilds the schedule from the written job: the same section, so the same curve."""
    cfg = config.load(None, [f"train.schedule={override}"], check_data=False)
    again = config.from_dict(config.to_dict(cfg)).train.schedule
    assert again == cfg.train.schedule
    total = 1000 * 2**20.0
    assert [again.value(t, total, 1e-3) for t in range(0, int(total), 2**22)] == \
        [cfg.train.schedule.value(t, total, 1e-3) for t in range(0, int(total), 2**22)]


BAD_SCHEDULES = [
    ("{name: wsd, decay: 1.5}", ["train.schedule.decay: got 1.5", "less than or equal to 1"]),
    ("{name: wsd, warmup: 0.9}", ["train.schedule.decay: got 0.2", "warmup (0.9) + decay (0.2) must be at most 1"]),
    ("{name: wsd, decay_shape: exp}", ["train.schedule.decay_shape: got 'exp'", "'cosine', 'linear' or '1-sqrt'"]),
    ("{name: wsd, decay_tokens: -1}", ["train.schedule.decay_tokens: got -1", "greater than or equal to 0"]),
    ("{warmup_tokens: -5}", ["train.schedule.warmup_tokens: got -5", "greater than or equal to 0"]),
    ("{name: rewarm, start_lr_ratio: 1.5}", ["train.schedule.start_lr_ratio: got 1.5", "less than or equal to 1"]),
    ("{name: inverse-sqrt, timescale: 0}", ["train.schedule.timescale: got 0", "greater than 0"]),
    ("{name: infinite, cooldown: 0.96}", ["train.schedule.cooldown: got 0.96", "warmup (0.05) + cooldown (0.96)"]),
    ("{name: infinite, cooldown_shape: linear}", ["train.schedule.cooldown_shape: got 'linear'",
                                                  "'cosine' or 'inverse-sqrt'"]),
    ("{name: infinite, min_lr_ratio: 0}", ["train.schedule.min_lr_ratio: got 0", "greater than 0"]),
    ("{name: infinite, min_lr_ratio: 0.6}", ["train.schedule.min_lr_ratio: got 0.6", "at most const_lr_ratio"]),
    ("{name: infinite, anneal_tokens: 100}", ["train.schedule.anneal_tokens: got 100", "go together"]),
    ("{name: infinite, anneal_start_tokens: 100}", ["train.schedule.anneal_tokens: got None", "go together"]),
    ("{name: infinite, anneal_start_tokens: 100, anneal_tokens: 0}", ["train.schedule.anneal_tokens: got 0",
                                                                      "greater than 0"]),
    ("{name: wsd, cooldown: 0.1}", ["train.schedule.cooldown: not a field of train.schedule.name 'wsd' (it is a "
                                    "field of 'infinite')"]),
    ("{name: wsdd}", ["train.schedule.name: got 'wsdd'", "'wsd'", "'infinite'"]),
]


@pytest.mark.parametrize("override,expected", BAD_SCHEDULES, ids=[o for o, _ in BAD_SCHEDULES])
def test_bad_schedule_fields_are_refused_naming_the_field(override, expected):
    with pytest.raises(config.ConfigError) as err:
        config.load(None, [f"train.schedule={override}"], check_data=False)
    for fragment in expected:
        assert fragment in str(err.value)


def test_token_counts_lift_the_share_check():
    """Shares that overlap are refused; a token count in place of either share is checked by nothing but the run."""
    for fields in ("{name: wsd, warmup: 0.9, decay_tokens: 100}", "{name: wsd, warmup_tokens: 1e6, decay: 0.9}",
                   "{name: infinite, warmup: 0.5, cooldown_tokens: 1e9}"):
        config.load(None, [f"train.schedule={fields}"], check_data=False)
