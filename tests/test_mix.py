"""Mixing by weight (raypt.data.mix): exact per-batch counts, staged weights at token counts, rank slices.

Pure numpy, no Ray: every expectation is checked against a brute-force replay of the run batch by batch.
"""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from raypt.data.mix import MixPlan, allocate, rank_slots


def largest_remainder(weights, total: int) -> list[int]:
    """Reference allocation in exact arithmetic: floors, then +1 by largest remainder, ties to the earlier source."""
    weights = [Fraction(w) for w in weights]
    shares = [w / sum(weights) * total for w in weights]
    counts = [s.numerator // s.denominator for s in shares]
    order = sorted(range(len(shares)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


# ---------------------------------------------------------------------------------------------------- allocate


@pytest.mark.parametrize("weights, total, expected", [
    ([0.6, 0.3, 0.1], 20, [12, 6, 2]),
    ([1, 1, 1], 10, [4, 3, 3]),          # remainders tie: the earlier source gets the extra sample
    ([5, 3, 2], 7, [4, 2, 1]),           # shares 3.5, 2.1, 1.4: largest remainder (0.5) wins, not rounding of each
    ([1, 2], 1, [0, 1]),
    ([0.0, 1.0, 1.0], 5, [0, 3, 2]),     # a zero weight gets nothing, even with samples left over
    ([0, 0, 3, 0], 9, [0, 0, 9, 0]),
    ([2, 0, 1], 0, [0, 0, 0]),
])
def test_allocate_known_cases(weights, total, expected):
    counts = allocate(np.array(weights, dtype=float), total)
    assert counts.dtype.kind == "i"
    assert counts.tolist() == expected


def test_allocate_matches_exact_largest_remainder_on_random_weights():
    rng = np.random.default_rng(0)
    for _ in range(500):
        n = int(rng.integers(1, 7))
        weights = rng.integers(0, 20, n)
        if weights.sum() == 0:
            weights[int(rng.integers(0, n))] = 1
        total = int(rng.integers(0, 200))
        counts = allocate(weights.astype(float), total)
        assert int(counts.sum()) == total
        exact = largest_remainder(weights.tolist(), total)
        # largest remainder up to float rounding: remainders that tie exactly (11/56*120 and 18/56*120 both end
        # in .571428...) may be broken by the last bit of the float share instead of by source order
        share = [Fraction(int(w), int(weights.sum())) * total for w in weights]
        floor = [s.numerator // s.denominator for s in share]
        extra = [c - f for c, f in zip(counts.tolist(), floor)]
        assert all(e in (0, 1) for e in extra), (weights, total)
        got = [share[i] - floor[i] for i in range(n) if extra[i]]
        left = [share[i] - floor[i] for i in range(n) if not extra[i]]
        assert not got or not left or min(got) >= max(left), (weights, total, counts, exact)
        if len({share[i] - floor[i] for i in range(n)}) == n:  # no ties at all: exactly the reference
            assert counts.tolist() == exact, (weights, total)
        assert np.all(counts[weights == 0] == 0)
        share = weights / weights.sum() * total
        assert np.all(np.abs(counts - share) < 1)  # proportional: never a whole sample off
        assert allocate(weights.astype(float), total).tolist() == counts.tolist()  # deterministic


def test_allocate_real_valued_weights_sum_and_stay_within_one_sample():
    rng = np.random.default_rng(1)
    for _ in range(300):
        weights = rng.random(int(rng.integers(2, 6))) * rng.integers(0, 2, 1)[0] + rng.random(1)
        weights[rng.random(len(weights)) < 0.3] = 0.0
        if weights.sum() == 0:
            weights[0] = 0.5
        total = int(rng.integers(1, 300))
        counts = allocate(weights, total)
        assert int(counts.sum()) == total and counts.min() >= 0
        assert np.all(counts[weights == 0] == 0)
        assert np.all(np.abs(counts - weights / weights.sum() * total) < 1)


# -------------------------------------------------------------------------------------- one stage, exact counts


def test_every_global_batch_has_exact_counts_and_sources_are_read_without_gap_or_repeat():
    plan = MixPlan([(0, np.array([0.6, 0.3, 0.1]))], 20, np.array([128, 64, 32]))
    batches = 50
    seen: list[list[int]] = [[], [], []]
    for b in range(batches):
        src, pos = plan.slots(b)
        assert len(src) == len(pos) == 20
        assert np.bincount(src, minlength=3).tolist() == [12, 6, 2], b
        for s in range(3):
            seen[s] += pos[src == s].tolist()
        assert plan.consumed(b).tolist() == [12 * b, 6 * b, 2 * b]
        assert plan.tokens_before(b) == b * (12 * 128 + 6 * 64 + 2 * 32)
    for s, per_batch in enumerate([12, 6, 2]):
        k = per_batch * batches
        assert len(seen[s]) == k
        assert sorted(seen[s]) == list(range(k)), f"source {s}: repeated or skipped samples"


def test_slots_are_a_pure_function_of_the_batch_index():
    plan = MixPlan([(0, np.array([0.6, 0.3, 0.1])), (5000, np.array([0.2, 0.2, 0.6]))], 20, np.array([64, 64, 64]))
    other = MixPlan([(0, np.array([0.6, 0.3, 0.1])), (5000, np.array([0.2, 0.2, 0.6]))], 20, np.array([64, 64, 64]))
    for b in [17, 3, 0, 40, 3, 17]:  # any order, any plan instance: a resume lands on the same samples
        a, c = plan.slots(b), other.slots(b)
        assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])


# -------------------------------------------------------------------------------------------- staged weights


def brute_force(stages, global_batch, tokens_per_sample, batches):
    """Replay the run: batch b uses the last stage whose at_tokens the tokens before b have reached."""
    tps = np.asarray(tokens_per_sample)
    tokens, consumed = 0, np.zeros(len(tps), dtype=np.int64)
    out = []
    for _ in range(batches):
        stage = max(i for i, (at, _) in enumerate(stages) if tokens >= at)
        counts = np.array(largest_remainder(stages[stage][1], global_batch))
        out.append({"stage": stage, "tokens": tokens, "consumed": consumed.copy(), "counts": counts})
        tokens += int(counts @ tps)
        consumed = consumed + counts
    return out


def check_against_brute_force(stages, global_batch, tokens_per_sample, batches):
    plan = MixPlan([(at, np.asarray(w, dtype=float)) for at, w in stages], global_batch,
                   np.asarray(tokens_per_sample))
    expected = brute_force(stages, global_batch, tokens_per_sample, batches)
    seen = [[] for _ in tokens_per_sample]
    for b, e in enumerate(expected):
        assert plan.tokens_before(b) == e["tokens"], b
        assert plan.consumed(b).tolist() == e["consumed"].tolist(), b
        src, pos = plan.slots(b)
        assert np.bincount(src, minlength=len(tokens_per_sample)).tolist() == e["counts"].tolist(), b
        assert plan.stage(b) == e["stage"], b
        for s in range(len(tokens_per_sample)):
            seen[s] += pos[src == s].tolist()
    total = expected[-1]["consumed"] + expected[-1]["counts"]
    for s in range(len(tokens_per_sample)):
        assert sorted(seen[s]) == list(range(int(total[s]))), f"source {s} repeated or skipped a sample"
    return plan, expected


def test_stage_switches_at_first_batch_whose_tokens_before_reach_at_tokens():
    # text 128 tokens a sample, image 64: stage 0 reads 6x128 + 2x64 = 896 tokens a batch
    stages = [(0, [0.75, 0.25]), (4000, [0.25, 0.75])]
    plan, expected = check_against_brute_force(stages, 8, [128, 64], 20)
    first = next(b for b, e in enumerate(expected) if e["tokens"] >= 4000)
    assert first == 5  # 4 x 896 = 3584 < 4000 <= 4480 = 5 x 896
    assert [plan.stage(b) for b in range(first - 1, first + 2)] == [0, 1, 1]
    assert plan.tokens_before(first) == 4480
    assert plan.consumed(first).tolist() == [30, 10]
    # after the switch a batch holds 2x128 + 6x64 = 640 tokens
    assert plan.tokens_before(first + 3) == 4480 + 3 * 640
    assert plan.consumed(first + 3).tolist() == [30 + 3 * 2, 10 + 3 * 6]


def test_stage_boundary_is_inclusive_when_at_tokens_hits_a_batch_edge_exactly():
    stages = [(0, [0.5, 0.5]), (3 * (4 * 128 + 4 * 64), [1.0, 0.0])]
    plan, expected = check_against_brute_force(stages, 8, [128, 64], 10)
    assert [plan.stage(b) for b in range(6)] == [0, 0, 0, 1, 1, 1]


def test_replay_stage_brings_in_a_source_that_had_weight_zero():
    stages = [(0, [1.0, 0.0, 0.0]), (3000, [0.5, 0.5, 0.0]), (6913, [0.5, 0.25, 0.25])]
    plan, expected = check_against_brute_force(stages, 8, [128, 64, 32], 25)
    # stage 0: 1024 tokens a batch -> 3000 reached before batch 3; stage 1: 768 a batch -> 6913 before batch 9
    assert plan.first_batch == [0, 3, 9]
    for b in range(3):
        src, _ = plan.slots(b)
        assert set(src.tolist()) == {0}
    src, pos = plan.slots(3)
    assert pos[src == 1].tolist() == [0, 1, 2, 3]   # the new source starts at its first sample
    assert plan.consumed(3).tolist() == [24, 0, 0]
    src, pos = plan.slots(9)
    assert sorted(pos[src == 2].tolist()) == [0, 1]
    assert plan.consumed(9).tolist() == [24 + 6 * 4, 6 * 4, 0]


def test_stages_already_reached_start_at_the_same_batch():
    # the third stage's at_tokens is passed within the same batch the second starts: both start together
    stages = [(0, [1.0, 0.0]), (100, [0.5, 0.5]), (900, [0.0, 1.0])]
    plan, expected = check_against_brute_force(stages, 8, [128, 64], 8)
    assert plan.stage(1) == 2 and plan.first_batch[1] == plan.first_batch[2] == 1


def test_random_staged_plans_match_brute_force():
    rng = np.random.default_rng(7)
    for _ in range(40):
        n = int(rng.integers(2, 5))
        tps = rng.choice([16, 32, 64, 128, 256], n)
        global_batch = int(rng.integers(1, 33))
        stages, at = [], 0
        for i in range(int(rng.integers(1, 5))):
            weights = rng.integers(0, 5, n).astype(float)
            if weights.sum() == 0:
                weights[int(rng.integers(0, n))] = 1
            stages.append((at, weights.tolist()))
            at += int(rng.integers(1, 20 * global_batch * int(tps.max())))
        check_against_brute_force(stages, global_batch, tps.tolist(), 60)


# ------------------------------------------------------------------------------------------------ rank slices


@pytest.mark.parametrize("stages", [
    [(0, [0.6, 0.3, 0.1])],
    [(0, [1.0, 0.0, 0.0]), (20_000, [0.2, 0.5, 0.3])],
])
def test_rank_slices_tile_every_global_batch_at_any_world_size(stages):
    plan = MixPlan([(at, np.asarray(w)) for at, w in stages], 20, np.array([128, 64, 32]))
    first, num = 3, 30
    whole_src, whole_pos = rank_slots(plan, first, num, 1, 0)
    assert len(whole_src) == 20 * num
    for b in range(num):
        src, pos = plan.slots(first + b)
        assert np.array_equal(whole_src[20 * b:20 * (b + 1)], src)
        assert np.array_equal(whole_pos[20 * b:20 * (b + 1)], pos)
    for world in (2, 4):
        per_rank = 20 // world
        parts = [rank_slots(plan, first, num, world, r) for r in range(world)]
        assert all(len(s) == len(p) == per_rank * num for s, p in parts)
        src = np.concatenate([s.reshape(num, per_rank) for s, _ in parts], axis=1).reshape(-1)
        pos = np.concatenate([p.reshape(num, per_rank) for _, p in parts], axis=1).reshape(-1)
        assert np.array_equal(src, whole_src), world
        assert np.array_equal(pos, whole_pos), world
        # no (source, position) pair is given to two ranks
        pairs = {(int(s), int(p)) for s, p in zip(src, pos)}
        assert len(pairs) == len(src)


def test_each_rank_slice_is_mixed():
    plan = MixPlan([(0, np.array([0.5, 0.5]))], 8, np.array([128, 64]))
    for rank in range(2):
        src, _ = rank_slots(plan, 0, 10, 2, rank)
        for b in range(10):
            assert np.bincount(src[4 * b:4 * (b + 1)], minlength=2).tolist() == [2, 2], (rank, b)

    plan = MixPlan([(0, np.array([0.6, 0.3, 0.1]))], 20, np.array([128, 64, 32]))
    counts = np.array([12, 6, 2])
    for world in (2, 4):
        for rank in range(world):
            src, _ = rank_slots(plan, 0, 5, world, rank)
            per_rank = 20 // world
            for b in range(5):
                got = np.bincount(src[per_rank * b:per_rank * (b + 1)], minlength=3)
                # every rank's share of a source is within one sample of its proportional share
                assert np.all(np.abs(got - counts / world) < 1), (world, rank, b, got.tolist())
