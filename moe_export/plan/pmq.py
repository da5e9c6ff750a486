"""PMQ-like baseline (MC-MoE's pre-loading mixed-precision quantization), solved exactly.

Per MoE layer, with f_e the routing frequency, w_e the mean routing weight and L_e(b) the output
error of expert e quantized at b bits on its calibration tokens:

    min_b  sum_e f_e^alpha * w_e^beta * L_e(b(e))^alpha   s.t.  sum_e b(e) = b_avg * E,
           at least one expert at each ``require``d width                      (alpha=1, beta=1.5)

MC-MoE solves an ILP with Gurobi under "total bits <= budget"; the equality keeps the mean equal to
the declared target like every other plan, and the exact DP in ``allocation.knapsack`` replaces the
commercial solver.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moe_export.plan.allocation import knapsack

ALPHA, BETA = 1.0, 1.5


def expert_forward(x: torch.Tensor, gate, up, down, act) -> torch.Tensor:
    """One expert on routed tokens ``x`` ``[T_e, H]`` -> ``[T_e, H]``; ``gate`` None = Switch (act(wi x))."""
    h = act(x @ up.T) if gate is None else act(x @ gate.T) * (x @ up.T)  # [T_e, I]
    return h @ down.T


def output_errors(x: torch.Tensor, gate, up, down, act, levels: Sequence[int], quantizer, group_size, symmetric) -> torch.Tensor:
    """L_e(b) for each level: mean over tokens of ``||y - y_b||^2`` with all projections at b bits -> ``[L]``."""
    if x.shape[0] == 0:
        return torch.zeros(len(levels), dtype=torch.float64)  # never routed: no measured error
    f32 = lambda w: None if w is None else w.to(torch.float32)
    gate, up, down = f32(gate), f32(up), f32(down)
    y = expert_forward(x, gate, up, down, act)
    out = []
    for b in levels:
        q = lambda w: None if w is None else quantizer.quantize(w, b, group_size, symmetric).dequantize(torch.float32)
        yb = expert_forward(x, q(gate), q(up), q(down), act)
        out.append(float((y - yb).square().sum(dtype=torch.float64)) / x.shape[0])
    return torch.tensor(out, dtype=torch.float64)


def pmq_cost(freq: torch.Tensor, weight: torch.Tensor, err: torch.Tensor, alpha: float = ALPHA, beta: float = BETA) -> torch.Tensor:
    """``[E]``, ``[E]``, ``[E, L]`` -> the objective's ``[E, L]`` terms."""
    f, w = freq.to(torch.float64), weight.to(torch.float64)
    return (f.pow(alpha) * w.pow(beta))[:, None] * err.to(torch.float64).pow(alpha)


def allocate(freq, weight, err, levels: Sequence[int], b_avg: float, alpha=ALPHA, beta=BETA, require: Sequence[int] = ()) -> list[int]:
    E = err.shape[0]
    return knapsack(pmq_cost(freq, weight, err, alpha, beta), levels, round(b_avg * E), require)


def default_require(levels: Sequence[int]) -> list[int]:
    """MC-MoE's "at least one 3-bit and one 2-bit expert" over {1, 2, 3}: the two highest of 3+ levels."""
    lv = sorted(levels, reverse=True)
    return lv[:2] if len(lv) >= 3 else []
