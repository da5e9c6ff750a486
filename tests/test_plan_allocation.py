"""Allocation rules of the paper (sec. 5 of paper-notes): count tables, zeta rearrangement, knapsack."""

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

from moe_export.plan.allocation import (
    AllocationError,
    bits_from_order,
    check_reachable,
    knapsack,
    level_counts,
    paper_allocation,
    reachable,
    rearrange,
    three_level_counts,
    two_level_counts,
)

# paper-notes sec. 5, from running the official solve_three_level_counts_policy: b_avg -> (#1-bit, #2-bit, #3-bit)
MIXTRAL_E8_321 = {
    1.5: (4, 4, 0), 1.625: (3, 5, 0), 1.75: (4, 2, 2), 1.875: (3, 3, 2), 2.0: (2, 4, 2), 2.125: (2, 3, 3),
    2.25: (2, 2, 4), 2.375: (2, 1, 5), 2.5: (2, 0, 6), 2.625: (1, 1, 6), 2.75: (1, 0, 7), 2.875: (0, 1, 7),
}
# Switch E=64 with 3/2 bits: b_avg -> experts at 3 bits
SWITCH_E64_32 = {2.125: 8, 2.25: 16, 2.5: 32, 2.75: 48, 2.875: 56}


@pytest.mark.parametrize("b_avg,expected", MIXTRAL_E8_321.items())
def test_three_level_table_e8(b_avg, expected):
    n_h, n_m, n_l = three_level_counts(8, b_avg, 3, 2, 1)
    assert (n_l, n_m, n_h) == expected
    assert level_counts(8, b_avg, [1, 3, 2]) == {3: n_h, 2: n_m, 1: n_l}
    assert (3 * n_h + 2 * n_m + n_l) / 8 == b_avg


@pytest.mark.parametrize("b_avg,n_high", SWITCH_E64_32.items())
def test_two_level_table_e64(b_avg, n_high):
    assert two_level_counts(64, b_avg, 3, 2) == (n_high, 64 - n_high)
    assert level_counts(64, b_avg, [3, 2]) == {3: n_high, 2: 64 - n_high}


def test_two_level_clip_and_bankers_rounding():
    assert two_level_counts(8, 3.5, 3, 2) == (8, 0)  # kappa clipped to 1
    assert two_level_counts(8, 1.0, 3, 2) == (0, 8)  # kappa clipped to 0
    assert two_level_counts(8, 2.0625, 3, 2) == (0, 8)  # kappa*E = 0.5 -> 0 (half to even)
    assert two_level_counts(8, 2.1875, 3, 2) == (2, 6)  # kappa*E = 1.5 -> 2
    assert two_level_counts(10, 2.1, 3, 2) == (1, 9)  # 2.1 is 21/10 exactly, not the nearest double
    with pytest.raises(AllocationError, match="b_h > b_l"):
        two_level_counts(8, 2.5, 2, 3)


def test_three_level_needs_equal_spacing():
    with pytest.raises(AllocationError, match="equally spaced"):
        three_level_counts(8, 2.5, 4, 2, 1)
    with pytest.raises(AllocationError, match="1-3 levels"):
        level_counts(8, 2.5, [4, 3, 2, 1])


def test_rearrangement_paper_example():
    assert rearrange(range(8), [1, 2, 1, 1, 1, 1, 5, 1], zeta=3.0) == [6, 0, 1, 2, 3, 4, 5, 7]


def test_rearrangement_strict_inequality_and_highest_position():
    # 3 * 1 < 3 is false: no move at exactly zeta times the MaxVar
    assert rearrange([0, 1, 2], [1.0, 1.0, 3.0], zeta=3.0) == [0, 1, 2]
    assert rearrange([0, 1, 2], [1.0, 1.0, 3.0001], zeta=3.0) == [2, 0, 1]
    # jumps above the FIRST qualifying expert, not just its neighbour; never moves down
    assert rearrange([0, 1, 2, 3], [1.0, 1.0, 1.0, 3.5], zeta=3.0) == [3, 0, 1, 2]
    # 3 jumps to the top (3 * 1 < 3.5), then 2 and 1 (var 10) each jump above expert 0 but not above 3 (3 * 3.5 > 10)
    assert rearrange([0, 1, 2, 3], [1.0, 10.0, 10.0, 3.5], zeta=3.0) == [3, 2, 1, 0]
    assert rearrange([3, 0, 1, 2], [1.0, 1.0, 1.0, 10.0], zeta=3.0) == [3, 0, 1, 2]


def test_rearrangement_is_a_single_pass():
    # Reverse pass: e=2 (var 4) finds nothing (3*2=6 > 4) and stays; e=1 (var 2) moves above 0 (3*0.5 < 2).
    # A loop-until-stable variant would then move 2 above 0 as well (3*0.5 < 4) only if 2 was re-checked.
    order = rearrange([0, 2, 1], [0.5, 2.0, 4.0], zeta=3.0)
    # e=1 first (last in order): hits = [0] -> [1, 0, 2]; then e=2: hits where 3*var < 4 -> x=0 at index 1 -> [1, 2, 0]
    assert order == [1, 2, 0]


def test_bits_from_order():
    assert bits_from_order([6, 0, 1, 2, 3, 4, 5, 7], {3: 2, 2: 4, 1: 2}) == [3, 2, 2, 2, 2, 1, 3, 1]
    with pytest.raises(AllocationError, match="permutation"):
        bits_from_order([0, 0, 1], {3: 3})
    with pytest.raises(AllocationError, match="add up"):
        bits_from_order([0, 1, 2], {3: 2})


def paper_bits(L_s, b_avg, levels, maxvar=None, zeta=3.0):
    """Widths by the planner's allocation (``methods._plan_layer`` calls ``paper_allocation`` for router methods)."""
    return paper_allocation(L_s, b_avg, levels, maxvar, zeta)[1]


def test_paper_bits_example_and_levels():
    # L_s ascending is 0..7; MaxVar promotes expert 6 to the top: at 2.5 bits (4 x 3-bit) 6,0,1,2 get 3 bits
    bits = paper_bits([0, 1, 2, 3, 4, 5, 6, 7], 2.5, [3, 2], maxvar=[1, 2, 1, 1, 1, 1, 5, 1])
    assert bits == [3, 3, 3, 2, 2, 2, 3, 2]
    assert paper_bits([0, 1, 2, 3, 4, 5, 6, 7], 2.5, [3, 2]) == [3, 3, 3, 3, 2, 2, 2, 2]


def test_reachable_and_message():
    assert reachable(8, 2.125, [3, 2])
    assert not reachable(8, 2.1, [3, 2])
    assert not reachable(8, 2.125, [4, 2])  # sums of 4s and 2s are even; 17 is not
    with pytest.raises(AllocationError, match=r"not reachable .* nearest reachable: 2, 2.125"):
        check_reachable(8, 2.1, [3, 2])
    with pytest.raises(AllocationError, match="outside the levels"):
        check_reachable(8, 3.5, [3, 2])


def _brute(cost, levels, total, require=()):
    best, arg = float("inf"), None
    for combo in itertools.product(range(len(levels)), repeat=cost.shape[0]):
        bits = [levels[j] for j in combo]
        if sum(bits) != total or any(r not in bits for r in require):
            continue
        v = sum(float(cost[e, j]) for e, j in enumerate(combo))
        if v < best - 1e-12:
            best, arg = v, bits
    return best, arg


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.sampled_from([[3, 2], [3, 2, 1], [4, 3, 2, 1], [8, 4, 2]]), st.integers(0, 10**6),
       st.booleans())
def test_knapsack_is_exact(E, levels, seed, use_require):
    g = torch.Generator().manual_seed(seed)
    cost = torch.rand(E, len(levels), generator=g, dtype=torch.float64)
    require = levels[:2] if use_require and E >= 2 else []
    total = int(torch.randint(min(levels) * E, max(levels) * E + 1, (1,), generator=g))
    best, ref = _brute(cost, levels, total, require)
    if ref is None:
        with pytest.raises(AllocationError):
            knapsack(cost, levels, total, require)
        return
    bits = knapsack(cost, levels, total, require)
    assert sum(bits) == total and all(r in bits for r in require)
    got = sum(float(cost[e, levels.index(b)]) for e, b in enumerate(bits))
    assert got == pytest.approx(best, abs=1e-12)


def _reachable_targets(E, levels):
    lo, hi = min(levels) * E, max(levels) * E
    return [s / E for s in range(lo, hi + 1) if reachable(E, s / E, levels)]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 64), st.sampled_from([[3, 2], [4, 2], [3, 2, 1], [6, 4, 2], [8, 4]]), st.data())
def test_mean_equals_target_whenever_reachable(E, levels, data):
    targets = _reachable_targets(E, levels)
    b_avg = data.draw(st.sampled_from(targets))
    counts = level_counts(E, b_avg, levels)
    assert sum(counts.values()) == E and all(n >= 0 for n in counts.values())
    assert sum(b * n for b, n in counts.items()) == pytest.approx(b_avg * E, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=32, unique=True),
       st.sampled_from([[3, 2], [3, 2, 1]]), st.data())
def test_monotone_in_L_s_without_maxvar(L_s, levels, data):
    E = len(L_s)
    b_avg = data.draw(st.sampled_from(_reachable_targets(E, levels)))
    bits = paper_bits(L_s, b_avg, levels)
    for a in range(E):
        for b in range(E):
            if L_s[a] < L_s[b]:
                assert bits[a] >= bits[b]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=24, unique=True), st.data())
def test_relabelling_experts_relabels_the_plan(L_s, data):
    E = len(L_s)
    var = data.draw(st.lists(st.floats(0.01, 100), min_size=E, max_size=E, unique=True))
    perm = data.draw(st.permutations(range(E)))
    levels = data.draw(st.sampled_from([[3, 2], [3, 2, 1]]))
    b_avg = data.draw(st.sampled_from(_reachable_targets(E, levels)))
    bits = paper_bits(L_s, b_avg, levels, maxvar=var)
    # new expert i is old expert perm[i]
    bits_p = paper_bits([L_s[p] for p in perm], b_avg, levels, maxvar=[var[p] for p in perm])
    assert bits_p == [bits[p] for p in perm]
    # exact knapsack: a generic cost has a unique optimum, so relabelling relabels it too
    g = torch.Generator().manual_seed(E)
    cost = torch.rand(E, 3, generator=g, dtype=torch.float64)
    kb = knapsack(cost, [3, 2, 1], 2 * E)
    assert knapsack(cost[list(perm)], [3, 2, 1], 2 * E) == [kb[p] for p in perm]
