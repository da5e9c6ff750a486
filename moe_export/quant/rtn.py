"""Round-to-nearest: the baseline every other quantizer is compared against."""

from __future__ import annotations

import torch

from moe_export.quant.base import (
    SCALE_DTYPE,
    QuantizedWeight,
    Quantizer,
    register_quantizer,
    resolve_group_size,
    zero_table,
)


def minmax_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool):
    """Scale and zero (float16, ``[N, K // g]``) from each group's range."""
    n, k = w.shape
    g = resolve_group_size(group_size, k)
    wg = w.float().reshape(n, k // g, g)
    qmax = 2**bits - 1
    if symmetric:
        if bits == 1:
            scale = 2 * wg.abs().mean(-1)  # sign binarisation: +-mean|w| minimises the L2 error
        else:
            scale = wg.abs().amax(-1) / (qmax / 2)
        return scale.clamp_min(2.0**-24).to(SCALE_DTYPE), None
    if bits == 1:
        # Two levels at mean +- mean|w - mean| (binarisation around the group mean); a min/max grid
        # would put both levels at the extremes and lose almost everything.
        mean = wg.mean(-1)
        # floor at |mean| / 1024 so a constant group's zero (0.5 - mean / scale) stays finite in float16
        spread = torch.maximum(2 * (wg - mean.unsqueeze(-1)).abs().mean(-1), mean.abs() / 1024)
        scale = spread.clamp_min(2.0**-24).to(SCALE_DTYPE)
        zero = (0.5 - mean / scale.float()).to(SCALE_DTYPE)
        return scale, zero
    lo = wg.amin(-1).clamp(max=0)  # the grid always contains 0
    hi = wg.amax(-1).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp_min(2.0**-24)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale.to(SCALE_DTYPE), zero.to(SCALE_DTYPE)


def quantize_with_params(w, bits, scale, zero) -> torch.Tensor:
    """``q = clamp(round(w / scale + zero), 0, 2**bits - 1)`` against the stored float16 params."""
    n, k = w.shape
    n_groups = scale.shape[-1]
    z = zero_table(zero, scale, bits)
    wg = w.float().reshape(n, n_groups, k // n_groups)
    q = torch.round(wg / scale.float().unsqueeze(-1) + z.float().unsqueeze(-1))
    return q.clamp(0, 2**bits - 1).to(torch.uint8).reshape(n, k)


@register_quantizer
class RTNQuantizer(Quantizer):
    name = "rtn"

    def quantize(self, weight, bits, group_size, symmetric, hessian=None) -> QuantizedWeight:
        scale, zero = minmax_params(weight, bits, group_size, symmetric)
        q = quantize_with_params(weight, bits, scale, zero)
        return QuantizedWeight(q, scale, zero, bits, group_size)
