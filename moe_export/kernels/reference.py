"""Plain-torch reference for the mixed-width expert matmuls: the CPU implementation of the custom ops
and the ground truth the Triton kernels are tested against.

Written independently of the kernels: the layout's reference unpack and dequantize (``runtime.layout.unpack``,
``runtime.layout.dequantize``, float32), one float32 matmul per routed expert, cast to ``x.dtype``.
"""

from __future__ import annotations

import torch

from moe_export.runtime.layout import dequantize, unpack, zero_or_constant


def expert_weight(e: int, packed, scales, zeros, bits, expert_bits, slot, k: int) -> torch.Tensor:
    """Dequantized float32 ``[N, K]`` weight of expert ``e``."""
    b = int(expert_bits[e])
    if b not in bits:
        raise ValueError(f"expert {e} has width {b} but the width groups hold {list(bits)}")
    i = list(bits).index(b)
    s = int(slot[e])
    if not 0 <= s < packed[i].shape[0]:
        raise ValueError(f"slot[{e}] = {s} is outside the {b}-bit group of {packed[i].shape[0]} experts")
    zero = zero_or_constant(None if zeros[i] is None else zeros[i][s], b)
    return dequantize(unpack(packed[i][s], b, k), scales[i][s], zero, torch.float32)


def gather_mm(x, expert_ids, packed, scales, zeros, bits, expert_bits, slot) -> torch.Tensor:
    """``out[s] = x[s] @ W[expert_ids[s]].T``: x ``[S, K]``, expert_ids ``[S]`` -> ``[S, N]``."""
    k = x.shape[1]
    out = torch.empty(x.shape[0], packed[0].shape[1], dtype=x.dtype, device=x.device)
    num_experts = expert_bits.shape[0]
    for e in expert_ids.unique().tolist():
        if not 0 <= e < num_experts:
            raise ValueError(f"expert id {e} is out of range for {num_experts} experts")
        rows = (expert_ids == e).nonzero().squeeze(1)  # [R_e]
        w = expert_weight(e, packed, scales, zeros, bits, expert_bits, slot, k)  # [N, K]
        out[rows] = (x[rows].float() @ w.T).to(x.dtype)
    return out


def grouped_mm(x, offs, packed, scales, zeros, bits, expert_bits, slot) -> torch.Tensor:
    """Rows of x ``[S, K]`` grouped by expert, ``offs [E]`` cumulative end rows -> ``[S, N]``; rows past
    ``offs[-1]`` are zero."""
    k = x.shape[1]
    out = torch.zeros(x.shape[0], packed[0].shape[1], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end < start or end > x.shape[0]:
            raise ValueError(f"offs must be non-decreasing and <= {x.shape[0]} rows, got {offs.tolist()}")
        if end > start:
            w = expert_weight(e, packed, scales, zeros, bits, expert_bits, slot, k)  # [N, K]
            out[start:end] = (x[start:end].float() @ w.T).to(x.dtype)
        start = end
    return out
