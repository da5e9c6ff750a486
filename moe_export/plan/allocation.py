"""From a ranking of experts to bit widths (paper sec. 5), and the exact knapsack the baselines use.

Notation: E experts per layer, b_avg target mean width, levels b_h > b_m > b_l. A ranking lists
expert ids from the highest priority (most bits) to the lowest. Every layer gets the same counts.

    two levels    kappa = clip((b_avg - b_l) / (b_h - b_l), 0, 1),  n_h = round(kappa * E)
    three levels  start from the two-level split that contains b_avg, then trade 2 b_m experts for
                  one b_h and one b_l (same mean) as far as the region of b_avg allows
    zeta rule     one pass from the lowest-priority expert up: an expert whose MaxVar is more than
                  zeta times an earlier expert's moves just before the first such expert

``round`` is Python's (half to even), as in the official code; kappa * E is computed exactly.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import torch


class AllocationError(ValueError):
    """The requested budget cannot be met with these levels and expert counts."""


def _frac(x) -> Fraction:
    # Through str so 2.1 means 21/10, not the nearest double.
    return Fraction(str(x)) if isinstance(x, float) else Fraction(x)


def two_level_counts(E: int, b_avg: float, b_h: int, b_l: int) -> tuple[int, int]:
    """-> (n_h, n_l): experts at b_h and at b_l."""
    if not b_h > b_l:
        raise AllocationError(f"two-level allocation needs b_h > b_l, got levels {b_h}, {b_l}")
    kappa = min(max((_frac(b_avg) - b_l) / (b_h - b_l), Fraction(0)), Fraction(1))
    n_h = round(kappa * E)
    return n_h, E - n_h


def three_level_counts(E: int, b_avg: float, b_h: int, b_m: int, b_l: int) -> tuple[int, int, int]:
    """-> (n_h, n_m, n_l). Levels must be equally spaced (b_h - b_m == b_m - b_l)."""
    if not (b_h > b_m > b_l and b_h - b_m == b_m - b_l):
        raise AllocationError(
            f"three-level allocation needs equally spaced levels b_h > b_m > b_l, got {b_h}, {b_m}, {b_l}"
        )
    b = _frac(b_avg)
    if b >= b_m:
        n_h, n_m = two_level_counts(E, b_avg, b_h, b_m)
        n_l = 0
    else:
        n_m, n_l = two_level_counts(E, b_avg, b_m, b_l)
        n_h = 0
    delta = Fraction(b_h - b_l)
    near_high = b > b_h - delta / 3
    middle = b_h - 2 * delta / 3 <= b <= b_h - delta / 3
    promoted = 0
    # Each trade: 2 x b_m -> b_h + b_l, the mean is unchanged.
    while n_m >= 2 and (near_high or (middle and n_m - 2 >= promoted + 1)):
        n_m, n_h, n_l, promoted = n_m - 2, n_h + 1, n_l + 1, promoted + 1
    return n_h, n_m, n_l


def level_counts(E: int, b_avg: float, levels: Sequence[int]) -> dict[int, int]:
    """Paper's counts for 1, 2 or 3 levels -> {bits: number of experts}, highest level first."""
    lv = sorted({int(b) for b in levels}, reverse=True)
    if len(lv) != len(levels):
        raise AllocationError(f"levels {list(levels)} repeat a width")
    if len(lv) == 1:
        return {lv[0]: E}
    if len(lv) == 2:
        return dict(zip(lv, two_level_counts(E, b_avg, *lv)))
    if len(lv) == 3:
        return dict(zip(lv, three_level_counts(E, b_avg, *lv)))
    raise AllocationError(
        f"the paper's rules take 1-3 levels, got {lv}; use --method weight-error or pmq for more levels"
    )


def reachable(E: int, b_avg: float, levels: Sequence[int]) -> bool:
    """Whether some assignment of ``levels`` to E experts has mean exactly ``b_avg``."""
    target = _frac(b_avg) * E
    if target.denominator != 1:
        return False
    sums = {0}
    for _ in range(E):
        sums = {s + b for s in sums for b in levels}
    return int(target) in sums


def nearest_reachable(E: int, b_avg: float, levels: Sequence[int], n: int = 2) -> list[float]:
    lo, hi = min(levels) * E, max(levels) * E
    cands = [s / E for s in range(lo, hi + 1) if reachable(E, Fraction(s, E), levels)]
    return sorted(cands, key=lambda c: (abs(c - float(b_avg)), c))[:n]


def check_reachable(E: int, b_avg: float, levels: Sequence[int]) -> None:
    if not min(levels) <= _frac(b_avg) <= max(levels):
        raise AllocationError(f"average {b_avg} bits lies outside the levels {sorted(levels, reverse=True)}")
    if not reachable(E, b_avg, levels):
        near = ", ".join(f"{c:g}" for c in sorted(nearest_reachable(E, b_avg, levels)))
        raise AllocationError(
            f"average {b_avg} bits is not reachable with {E} experts per layer at levels "
            f"{sorted(levels, reverse=True)}; nearest reachable: {near}"
        )


def rearrange(order: Sequence[int], maxvar: Sequence[float], zeta: float = 3.0) -> list[int]:
    """MaxVar rearrangement: single pass, strict ``zeta * var[x] < var[e]`` (the official code)."""
    var = [float(v) for v in maxvar]
    c = list(order)
    for e in reversed(list(order)):  # from the lowest-priority (largest L_s) expert
        hits = [k for k, x in enumerate(c) if zeta * var[x] < var[e]]
        if hits and c.index(e) > hits[0]:
            c.remove(e)
            c.insert(hits[0], e)
    return c


def bits_from_order(order: Sequence[int], counts: dict[int, int]) -> list[int]:
    """Top-ranked experts get the highest level: ``bits[e]`` for e = 0..E-1."""
    E = len(order)
    if sorted(order) != list(range(E)):
        raise AllocationError(f"ranking {list(order)} is not a permutation of 0..{E - 1}")
    if sum(counts.values()) != E:
        raise AllocationError(f"counts {counts} do not add up to {E} experts")
    bits = [0] * E
    pos = 0
    for b in sorted(counts, reverse=True):
        for e in order[pos : pos + counts[b]]:
            bits[e] = b
        pos += counts[b]
    return bits


def knapsack(cost: torch.Tensor, levels: Sequence[int], total_bits: int, require: Sequence[int] = ()) -> list[int]:
    """Exact per-layer solver: min sum_e cost[e, j(e)] s.t. sum_e levels[j(e)] == total_bits.

    ``cost`` ``[E, L]`` (column j = width ``levels[j]``). ``require``: widths that at least one expert
    must get (PMQ's "at least one expert at each of these"). Dynamic programming over (expert, bits
    used, required widths seen), filled from the last expert back over the states the first experts can reach:
    O(E * E*max(b) * L * 2^|require|), tiny for E <= 256. At each state the first column with the strictly
    smallest cost wins, so ties resolve to the lexicographically smallest choice sequence: deterministic.
    """
    E, L = cost.shape
    levels = [int(b) for b in levels]
    if L != len(levels):
        raise AllocationError(f"cost has {L} columns but {len(levels)} levels were given")
    req = [levels.index(b) for b in require if b in levels]
    if len(req) != len(require):
        raise AllocationError(f"required widths {list(require)} are not all among the levels {levels}")
    full = (1 << len(req)) - 1
    c = cost.to(torch.float64).tolist()
    INF = float("inf")
    seen = [sum(1 << r for r, lj in enumerate(req) if lj == j) for j in range(L)]  # required-width bits of column j
    lo, hi = min(levels, default=0), max(levels, default=0)

    def moves(e: int, s: int):
        # (j, bits used after expert e): what is left must still fit between the min and max level
        rest = E - e - 1
        return [(j, s + b) for j, b in enumerate(levels) if s + b + rest * lo <= total_bits <= s + b + rest * hi]

    # states[e] = the (bits used, mask seen) pairs that experts 0..e-1 can leave, in discovery order
    states: list[dict[tuple[int, int], None]] = [{(0, 0): None}]
    for e in range(E):
        nxt: dict[tuple[int, int], None] = {}
        for s, m in states[e]:
            for j, s2 in moves(e, s):
                nxt[(s2, m | seen[j])] = None
        states.append(nxt)
    # best[(s, m)] = (min cost of experts e..E-1 from that state, the first column reaching it), for e = E down to 0
    best = {(s, m): (0.0 if (s == total_bits and m == full) else INF, -1) for s, m in states[E]}
    choice: list[dict[tuple[int, int], int]] = [{} for _ in range(E)]
    for e in range(E - 1, -1, -1):
        cur = {}
        for s, m in states[e]:
            v_best, arg = INF, -1
            for j, s2 in moves(e, s):
                v = c[e][j] + best[(s2, m | seen[j])][0]
                if v < v_best:
                    v_best, arg = v, j
            cur[(s, m)] = (v_best, arg)
            choice[e][(s, m)] = arg
        best = cur
    if best[(0, 0)][0] == INF:
        raise AllocationError(
            f"no assignment of levels {levels} to {E} experts sums to {total_bits} bits"
            + (f" with at least one expert at each of {list(require)}" if require else "")
        )
    bits, s, m = [], 0, 0
    for e in range(E):
        j = choice[e][(s, m)]
        bits.append(levels[j])
        s += levels[j]
        m |= seen[j]
    return bits


def paper_allocation(L_s: Sequence[float] | torch.Tensor, b_avg: float, levels: Sequence[int],
                     maxvar: Sequence[float] | torch.Tensor | None = None, zeta: float = 3.0) -> tuple[list[int], list[int]]:
    """The paper's allocation for one layer -> (ranking, bits): experts by ascending L_s (stable), rearranged by
    MaxVar when ``maxvar`` is given, then the level counts from the top of the ranking down."""
    from moe_export.plan.router_norm import ascending_order

    order = ascending_order(torch.as_tensor(L_s, dtype=torch.float64))
    if maxvar is not None:
        order = rearrange(order, maxvar, zeta)
    return order, bits_from_order(order, level_counts(len(order), b_avg, levels))
