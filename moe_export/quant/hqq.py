"""HQQ: half-quadratic quantization (Badri & Shaji, 2023). Data-free; compare with rtn.py.

Per group of W, with s the (inverted, as HQQ stores it) scale and z the zero-point:

    min_{z, W_e}  ||W_e||_p^p + beta/2 ||W_e - (W - Q_z^{-1}(Q_z(W)))||_2^2,   p = 0.7
    W_q = round(W s + z),  W_r = (W_q - z) / s,  W_e = shrink_p(W - W_r; beta),  z = mean(W_q - (W - W_e) s)

The solver is torchao's (``optimize_weights_proximal_legacy``: 20 iterations, beta 10, kappa 1.01,
early stop on the mean |error|). At transformer weight scales the shrinkage zeroes every error below
~0.15, so W_e = 0 and each step is the least-squares zero-point for the current rounding; p then has
no effect (measured: p = 0.7 and p = 1 give identical weights on the zoo `tiny` model). What we add:

- asymmetric, 2-8 bits: the solver only moves z, so the answer depends on the start. torchao starts
  from the group's min/max; rtn.py starts from a range forced to contain 0. Neither start wins
  everywhere (measured on Gaussian and heavy-tailed weights), so both are solved and each group keeps
  the one with the lower L2 error against the float16 params it will be stored with.
- asymmetric, 1 bit: a min/max start puts both levels at the extremes (10-70% worse than RTN,
  measured), so only the RTN binarisation start (mean +- mean|W - mean|) is solved.
- symmetric, 2-8 bits: torchao's scale-only HQQ (least-squares scale alternating with rounding) on
  the signed grid [-2^(b-1), 2^(b-1) - 1], which is our grid with the constant zero 2^(b-1).
- symmetric, 1 bit: for fixed signs the L2-optimal scale is 2 mean|W|, which RTN already uses, and
  sign(W) is optimal for that scale: HQQ has nothing to move and returns RTN's answer.
"""

from __future__ import annotations

import torch

from moe_export.quant.base import (
    SCALE_DTYPE,
    QuantizedWeight,
    Quantizer,
    dequantize,
    register_quantizer,
    resolve_group_size,
    zero_table,
)
from moe_export.quant.rtn import minmax_params, quantize_with_params

_MIN_SCALE = 2.0**-24  # smallest float16 subnormal: a scale must survive the float16 cast as nonzero


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    return s.float().clamp_min(_MIN_SCALE).to(SCALE_DTYPE)


def _solve_zero(Wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, opt_params: dict):
    """torchao's proximal solver from a start (scale, zero) ``[N, G]``; returns float16 (scale, zero)."""
    from torchao.quantization.quant_primitives import optimize_weights_proximal_legacy

    n, n_groups, g = Wg.shape
    W = Wg.reshape(n * n_groups, g)
    s_inv = 1.0 / scale.float().clamp_min(_MIN_SCALE).reshape(-1, 1)  # HQQ quantizes as round(W * s + z)
    _, s_inv, z = optimize_weights_proximal_legacy(
        W, s_inv, zero.float().reshape(-1, 1), [0, 2**bits - 1], axis=1, device=W.device, opt_params=dict(opt_params)
    )
    return _fp16_scale(1.0 / s_inv.reshape(n, n_groups)), z.reshape(n, n_groups).to(SCALE_DTYPE)


def _group_l2(w: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None):
    q = quantize_with_params(w, bits, scale, zero)
    z = zero_table(zero, scale, bits)
    n, n_groups = scale.shape
    err = (dequantize(q, scale, z) - w.float()).reshape(n, n_groups, -1)
    return q, err.square().sum(-1)  # [N, K], [N, G]


def hqq_params(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, opt_params: dict):
    """float16 (scale, zero) ``[N, K // g]``; zero is None for symmetric grids."""
    from torchao.quantization.quant_primitives import (
        _choose_qparams_and_quantize_affine_hqq,
        _choose_qparams_and_quantize_scale_only_hqq,
    )

    n, k = w.shape
    g = resolve_group_size(group_size, k)
    W = w.float()
    if symmetric:
        if bits == 1:
            return _fp16_scale(minmax_params(W, bits, g, True)[0]), None
        half = 2 ** (bits - 1)
        _, scale = _choose_qparams_and_quantize_scale_only_hqq(W, [1, g], -half, half - 1)
        return _fp16_scale(scale.reshape(n, k // g)), None

    Wg = W.reshape(n, k // g, g)  # [N, G, g]
    s0, z0 = minmax_params(W, bits, g, False)
    scale, zero = _solve_zero(Wg, s0, z0, bits, opt_params)
    if bits == 1:
        return scale, zero
    _, s_mm, z_mm, _ = _choose_qparams_and_quantize_affine_hqq(
        W, nbits=bits, group_size=g, optimize=False, axis=1, compute_dtype=torch.float32, device=W.device, raw_output=True
    )
    s_mm, z_mm = _solve_zero(Wg, s_mm, z_mm, bits, opt_params)
    _, err_rtn_start = _group_l2(W, bits, scale, zero)
    _, err_mm_start = _group_l2(W, bits, s_mm, z_mm)
    take_mm = err_mm_start < err_rtn_start  # [N, G]
    return torch.where(take_mm, s_mm, scale), torch.where(take_mm, z_mm, zero)


@register_quantizer
class HQQQuantizer(Quantizer):
    name = "hqq"

    def __init__(self, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01, iters: int = 20):
        if not 0 < lp_norm <= 1:
            raise ValueError(f"hqq lp_norm must be in (0, 1], got {lp_norm}")
        if iters < 1:
            raise ValueError(f"hqq iters must be >= 1, got {iters}")
        self.opt_params = {"lp_norm": lp_norm, "beta": beta, "kappa": kappa, "iters": iters, "early_stop": True}

    def quantize(self, weight, bits, group_size, symmetric, hessian=None) -> QuantizedWeight:
        if weight.dim() != 2:
            raise ValueError(f"hqq quantizes 2-D [N, K] weights, got shape {tuple(weight.shape)}")
        if not 1 <= bits <= 8:
            raise ValueError(f"hqq supports 1-8 bits, got {bits}")
        scale, zero = hqq_params(weight, bits, group_size, symmetric, self.opt_params)
        q = quantize_with_params(weight, bits, scale, zero)
        return QuantizedWeight(q, scale, zero, bits, group_size)
