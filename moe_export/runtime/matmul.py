"""Plain-torch matmuls straight from packed width groups (``runtime.layout``), for eager and ``torch.compile``.

Everything here takes the stored bytes (uint8 packed, float16 scale/zero) and uses only aten ops, so
eager, ``torch.compile`` and ``torch.export`` all run the same code. Ways to multiply by a packed weight:

* ``layout.dequantize_packed`` then a float matmul: right when many rows share one weight (prefill);
* ``packed_matvec``: broadcast-multiply + sum over K written group-wise,
  ``y[n] = sum_g scale[n,g] * (sum_j q[n,g,j] x[g,j] - zero[n,g] * sum_j x[g,j])``,
  which inductor fuses into one reduction that reads the packed bytes and never writes a float weight
  (decode: a handful of rows per weight).
"""

from __future__ import annotations

import torch

from moe_export.runtime.layout import position_codes, symmetric_zero, unit_shape, zero_or_constant


def packed_matvec(
    x: torch.Tensor,  # [S, K]: one input row per packed weight
    packed: torch.Tensor,  # uint8 [S, N, K*b/8]
    scale: torch.Tensor,  # f16 [S, N, G]
    zero: torch.Tensor | None,  # f16 [S, N, G] or None
    bits: int,
) -> torch.Tensor:  # [S, N]
    s, k = x.shape
    n_groups = scale.shape[-1]
    dtype = x.dtype
    qx = _codes_dot(x, packed, bits, n_groups)  # [S, N, G] = sum_j q[n,g,j] x[g,j]
    xsum = x.reshape(s, 1, n_groups, k // n_groups).sum(-1)  # [S, 1, G]
    scale = scale.to(dtype)
    if zero is None:
        corr = xsum * symmetric_zero(bits)  # symmetric: the zero is one constant
    else:
        corr = xsum * zero.to(dtype)  # [S, N, G]
    return ((qx - corr) * scale).sum(-1)  # [S, N]


def _block(g: int) -> int:
    # reduction block: the quantization group, capped so the in-block permutation matrix stays small
    for blk in (g, 256, 128, 64, 32, 16, 8):
        if blk <= 256 and g % blk == 0:
            return blk
    return 8


def _split_positions(x: torch.Tensor, blk: int, per_unit: int) -> torch.Tensor:
    """``x [S, K]`` -> ``[S, K/blk, per_unit, blk/per_unit]``: inside every block, value ``u*per_unit + p``
    moves to ``[p, u]``. Done as a tiny matmul with a permutation matrix, which inductor keeps as its own
    buffer, so the reduction below reads x contiguously instead of gathering it per weight element."""
    s, k = x.shape
    units = blk // per_unit
    perm = torch.arange(blk, device=x.device).reshape(units, per_unit).t().reshape(-1)  # new index -> old
    pmat = (torch.arange(blk, device=x.device).unsqueeze(1) == perm.unsqueeze(0)).to(x.dtype)  # [blk, blk]
    return (x.reshape(s * (k // blk), blk) @ pmat).reshape(s, k // blk, per_unit, units)


def _codes_dot(x: torch.Tensor, packed: torch.Tensor, bits: int, n_groups: int) -> torch.Tensor:
    """``sum_j q[s,n,g,j] * x[s,g,j]`` straight from the packed bytes -> ``[S, N, G]``.

    Written per bit position so every load in the reduction is contiguous (or a fixed stride) and
    inductor vectorizes it: value p of every packed unit is a shift + mask of whole byte planes, and it
    meets the matching slice of x, rearranged once (``_split_positions``).
    """
    s, k = x.shape
    g = k // n_groups
    blk = _block(g)
    nblk = k // blk  # blocks per row; blocks never straddle a group
    per_unit, unit_bytes = unit_shape(bits)
    units = blk // per_unit
    xp = _split_positions(x, blk, per_unit).unsqueeze(1)  # [S, 1, nblk, per_unit, units]
    planes = packed.reshape(s, -1, nblk, units, unit_bytes)  # [S, N, nblk, units, unit_bytes]
    if bits < 8:
        planes = planes.to(torch.int32)
    acc = None
    for p in range(per_unit):
        term = position_codes(planes, p, bits).to(x.dtype) * xp[:, :, :, p]
        acc = term if acc is None else acc + term
    qx = acc.sum(-1)  # [S, N, nblk]
    return qx.reshape(s, qx.shape[1], n_groups, nblk // n_groups).sum(-1)  # [S, N, G]


def packed_linear_experts(
    x: torch.Tensor,  # [T, K] (every token through every expert) or [E, T, K] (rows per expert)
    packed: torch.Tensor,  # uint8 [E, N, K*b/8]
    scale: torch.Tensor,  # f16 [E, N, G]
    zero: torch.Tensor | None,  # f16 [E, N, G] or None
    bits: int,
) -> torch.Tensor:  # [E, T, N]
    """``x @ W_e.T`` for all experts, one matmul per bit position instead of one interleaved dequantize.

    Value p of every packed unit (a byte for 1/2/4 bits, 8 values in b bytes otherwise) is dequantized
    from whole byte planes into ``w_p [E, N, K/P]`` (contiguous loads and stores, so inductor vectorizes
    it) and meets the matching strided columns of x: ``y = sum_p x[:, p::P] @ w_p.T``. Each weight is
    dequantized exactly as ``dequantize_packed`` does; only the summation order differs.
    """
    k = x.shape[-1]
    e, n, _ = packed.shape
    dtype = x.dtype
    n_groups = scale.shape[-1]
    per_unit, unit_bytes = unit_shape(bits)
    units = k // per_unit
    planes = packed.reshape(e, n, units, unit_bytes)  # [E, N, U, B]
    xs = x.reshape(*x.shape[:-1], units, per_unit)  # [(E,) T, U, P]
    sc = scale.to(dtype).unsqueeze(-1)  # [E, N, G, 1]
    zr = zero_or_constant(zero, bits)
    zr = zr if isinstance(zr, float) else zr.to(dtype).unsqueeze(-1)
    out = None
    for p in range(per_unit):
        v = position_codes(planes, p, bits)  # [E, N, U] uint8
        w = ((v.to(dtype).reshape(e, n, n_groups, units // n_groups) - zr) * sc).reshape(e, n, units)
        y = torch.matmul(xs[..., p], w.transpose(1, 2))  # [(E,) T, U] @ [E, U, N] -> [E, T, N]
        out = y if out is None else out + y
    return out
