"""Data-free, error-aware plan: each expert's weight reconstruction error at every candidate width.

    err[e, j] = sum_P ||W_P^(e) - Q_b(W_P^(e))||_F^2        b = levels[j], P over the expert's projections
    min_b  sum_e c_e * err[e, b(e)]   s.t.  sum_e b(e) = b_avg * E          (exact knapsack, per layer)

Q is the configured quantizer (RTN by default, via ``moe_export.quant.base.get_quantizer``) at the
plan's group size and symmetry, so the error is what quantization will actually do to the weights.
``c_e = 1`` or, with router weighting, ``1 + gamma * (max L - L_s) / (max L - min L)``: the paper's
small-L_s experts count up to (1 + gamma) times more.
"""

from __future__ import annotations

from typing import Sequence

import torch

from moe_export.plan.allocation import knapsack

# Rows quantized at once: bounds the float32 working copy of a [14336, 4096] expert weight.
_CHUNK = 2048


def reconstruction_error(W: torch.Tensor, bits: int, quantizer, group_size, symmetric: bool, chunk: int = _CHUNK,
                         weight: torch.Tensor | None = None, moment: torch.Tensor | None = None) -> float:
    """``||W - Q_b(W)||_F^2`` of one ``[N, K]`` weight, quantized ``chunk`` rows at a time (groups run along K);
    with ``weight`` (``[N, K]``, e.g. a diagonal Fisher) ``sum weight * (W - Q_b(W))^2``; with ``moment`` (``[K, K]``,
    the second moment ``E[x x^T]`` of the weight's inputs) ``tr(dW moment dW^T) = E||dW x||^2``. A data-aware
    quantizer (GPTQ) quantizes against ``moment`` as its Hessian (rows are independent given it, so chunks are
    too): the error is that of the grid it produces on those inputs."""
    if quantizer.needs_calibration and moment is None:
        raise ValueError(f"{quantizer.name} quantizes a weight against its inputs: its error needs their moment")
    hessian = moment.to(torch.float32) if quantizer.needs_calibration else None
    total = 0.0
    for start in range(0, W.shape[0], chunk):
        w = W[start : start + chunk].to(torch.float32)  # [c, K]
        qw = quantizer.quantize(w, bits, group_size, symmetric, hessian=hessian)
        d = w - qw.dequantize(torch.float32)  # [c, K]
        if moment is not None:
            sq = (d @ moment.to(torch.float32)) * d
        else:
            sq = d.square()
        if weight is not None:
            sq = sq * weight[start : start + chunk].to(torch.float32)
        total += float(sq.sum(dtype=torch.float64))
    return total


def expert_errors(weights: Sequence[torch.Tensor], levels: Sequence[int], quantizer, group_size, symmetric) -> torch.Tensor:
    """One expert: ``weights`` its projections ``[N, K]`` -> ``[L]`` float64 summed squared error per level."""
    return torch.tensor(
        [sum(reconstruction_error(W, b, quantizer, group_size, symmetric) for W in weights) for b in levels],
        dtype=torch.float64,
    )


def router_weighting(L_s: torch.Tensor, gamma: float) -> torch.Tensor:
    """``c_e`` in [1, 1 + gamma], largest for the smallest L_s. ``gamma = 0``: all ones."""
    L = L_s.to(torch.float64)
    span = float(L.max() - L.min())
    if gamma == 0 or span == 0:
        return torch.ones_like(L)
    return 1 + gamma * (L.max() - L) / span


def allocate(err: torch.Tensor, levels: Sequence[int], b_avg: float, weight: torch.Tensor | None = None) -> list[int]:
    """``err`` ``[E, L]`` -> per-expert bits minimising the (weighted) total error at mean ``b_avg``."""
    E = err.shape[0]
    c = err if weight is None else err * weight.to(err.dtype)[:, None]  # [E, L]
    return knapsack(c, levels, round(b_avg * E))
