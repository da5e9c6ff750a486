"""``torch.library`` custom ops for mixed-width expert matmuls.

    torch.ops.moe_export.mixed_width_gather_mm(x, expert_ids, packed, scales, zeros, bits, expert_bits, slot)
    torch.ops.moe_export.mixed_width_grouped_mm(x, offs, packed, scales, zeros, bits, expert_bits, slot)

Arguments are the width groups of one fused expert weight ``[E, N, K]`` (docs/architecture.md):
``packed[i]`` uint8 ``[E_b, N, K*b/8]``, ``scales[i]`` float16 ``[E_b, N, K/g]``, ``zeros[i]`` the same or
None (symmetric), ``bits[i]`` = b, ``expert_bits [E]``, ``slot [E]``. Both return ``[S, N]`` in ``x.dtype``.

CUDA runs the Triton kernels (``mixed_width_matmul``); every other device runs the plain-torch reference.
The fake kernels validate ranks, dtypes and shapes, so a bad call fails while ``torch.compile`` or
``torch.export`` traces it, not inside a kernel.
"""

from __future__ import annotations

from typing import Optional

import torch

from moe_export.kernels import reference

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT_DTYPES = (torch.int32, torch.int64)


def _fail(op: str, msg: str) -> None:
    raise ValueError(f"moe_export::{op}: {msg}")


def validate(op: str, x, index, packed, scales, zeros, bits, expert_bits, slot, *, index_name: str) -> None:
    """Check everything that shapes and dtypes can tell (no tensor values: this also runs on fake tensors)."""
    if x.dim() != 2 or x.dtype not in _FLOAT_DTYPES:
        _fail(op, f"x must be a 2-D float16/bfloat16/float32 tensor [S, K], got {x.dtype} {tuple(x.shape)}")
    k = x.shape[1]
    if k % 8:
        _fail(op, f"K = {k} must be a multiple of 8 (the packing unit)")
    if index.dim() != 1 or index.dtype not in _INT_DTYPES:
        _fail(op, f"{index_name} must be a 1-D int32/int64 tensor, got {index.dtype} {tuple(index.shape)}")
    for name, t in (("expert_bits", expert_bits), ("slot", slot)):
        if t.dim() != 1 or t.dtype not in _INT_DTYPES:
            _fail(op, f"{name} must be a 1-D int32/int64 tensor [E], got {t.dtype} {tuple(t.shape)}")
    num_experts = expert_bits.shape[0]
    if slot.shape[0] != num_experts:
        _fail(op, f"slot has {slot.shape[0]} entries but expert_bits has {num_experts}")
    want = num_experts if index_name == "offs" else x.shape[0]
    what = "one entry per expert" if index_name == "offs" else "one entry per row of x"
    if isinstance(want, int) and isinstance(index.shape[0], int):
        if index.shape[0] != want:
            _fail(op, f"{index_name} must have {what} ({want}), got {index.shape[0]}")
    else:  # symbolic sizes while tracing with dynamic shapes: a runtime assert, not a guard
        torch._check(index.shape[0] == want,
                     lambda: f"moe_export::{op}: {index_name} must have {what} ({want}), got {index.shape[0]}")
    if not (len(packed) == len(scales) == len(zeros) == len(bits)) or not packed:
        _fail(op, "packed/scales/zeros/bits must be non-empty lists of one length, got "
                  f"{len(packed)}/{len(scales)}/{len(zeros)}/{len(bits)}")
    if len(set(bits)) != len(bits):
        _fail(op, f"each width must appear once in bits, got {list(bits)}")
    n = packed[0].shape[1] if packed[0].dim() == 3 else None
    device = x.device
    groups_total = 0
    for b, p, s, z in zip(bits, packed, scales, zeros):
        if b not in range(1, 9):
            _fail(op, f"bit widths must be in 1..8, got {b}")
        if p.dtype != torch.uint8 or p.dim() != 3 or p.shape[1] != n or p.shape[2] * 8 != k * b:
            _fail(op, f"packed ({b}-bit) must be uint8 [E_b, N={n}, K*b/8={k * b // 8}], "
                      f"got {p.dtype} {tuple(p.shape)}")
        if s.dtype != torch.float16 or s.dim() != 3 or tuple(s.shape[:2]) != tuple(p.shape[:2]):
            _fail(op, f"scales ({b}-bit) must be float16 [E_b={p.shape[0]}, N={n}, K/g], "
                      f"got {s.dtype} {tuple(s.shape)}")
        if s.shape[2] == 0 or k % s.shape[2]:
            _fail(op, f"scales ({b}-bit) have {s.shape[2]} groups per row, which does not divide K = {k}")
        if z is not None and (z.dtype != torch.float16 or z.shape != s.shape):
            _fail(op, f"zeros ({b}-bit) must be None or float16 of the scales' shape {tuple(s.shape)}, "
                      f"got {z.dtype} {tuple(z.shape)}")
        if p.device != device or s.device != device or (z is not None and z.device != device):
            _fail(op, f"the {b}-bit group is on {p.device} but x is on {device}")
        groups_total += p.shape[0]
    if groups_total != num_experts:
        _fail(op, f"the width groups hold {groups_total} experts but expert_bits lists {num_experts}")


def _contiguous(x, packed, scales, zeros):
    return (x.contiguous(), [p.contiguous() for p in packed], [s.contiguous() for s in scales],
            [None if z is None else z.contiguous() for z in zeros])


# --- gather (decode) ----------------------------------------------------------------------------

@torch.library.custom_op("moe_export::mixed_width_gather_mm", mutates_args=())
def mixed_width_gather_mm(
    x: torch.Tensor,  # [S, K]
    expert_ids: torch.Tensor,  # [S]
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    zeros: list[Optional[torch.Tensor]],
    bits: list[int],
    expert_bits: torch.Tensor,  # [E]
    slot: torch.Tensor,  # [E]
) -> torch.Tensor:  # [S, N]
    validate("mixed_width_gather_mm", x, expert_ids, packed, scales, zeros, bits, expert_bits, slot,
             index_name="expert_ids")
    return reference.gather_mm(x, expert_ids, packed, scales, zeros, bits, expert_bits, slot)


@mixed_width_gather_mm.register_kernel("cuda")
def _gather_mm_cuda(x, expert_ids, packed, scales, zeros, bits, expert_bits, slot):
    validate("mixed_width_gather_mm", x, expert_ids, packed, scales, zeros, bits, expert_bits, slot,
             index_name="expert_ids")
    from moe_export.kernels import mixed_width_matmul as mwm

    x, packed, scales, zeros = _contiguous(x, packed, scales, zeros)
    return mwm.gather_mm(x, expert_ids.contiguous(), packed, scales, zeros, list(bits), expert_bits, slot)


@mixed_width_gather_mm.register_fake
def _gather_mm_fake(x, expert_ids, packed, scales, zeros, bits, expert_bits, slot):
    validate("mixed_width_gather_mm", x, expert_ids, packed, scales, zeros, bits, expert_bits, slot,
             index_name="expert_ids")
    return x.new_empty(x.shape[0], packed[0].shape[1])


# --- grouped (prefill) --------------------------------------------------------------------------

@torch.library.custom_op("moe_export::mixed_width_grouped_mm", mutates_args=())
def mixed_width_grouped_mm(
    x: torch.Tensor,  # [S, K], rows sorted by expert
    offs: torch.Tensor,  # [E] cumulative end rows
    packed: list[torch.Tensor],
    scales: list[torch.Tensor],
    zeros: list[Optional[torch.Tensor]],
    bits: list[int],
    expert_bits: torch.Tensor,
    slot: torch.Tensor,
) -> torch.Tensor:  # [S, N]
    validate("mixed_width_grouped_mm", x, offs, packed, scales, zeros, bits, expert_bits, slot, index_name="offs")
    return reference.grouped_mm(x, offs, packed, scales, zeros, bits, expert_bits, slot)


@mixed_width_grouped_mm.register_kernel("cuda")
def _grouped_mm_cuda(x, offs, packed, scales, zeros, bits, expert_bits, slot):
    validate("mixed_width_grouped_mm", x, offs, packed, scales, zeros, bits, expert_bits, slot, index_name="offs")
    from moe_export.kernels import mixed_width_matmul as mwm

    x, packed, scales, zeros = _contiguous(x, packed, scales, zeros)
    return mwm.grouped_mm(x, offs.contiguous(), packed, scales, zeros, list(bits), expert_bits, slot)


@mixed_width_grouped_mm.register_fake
def _grouped_mm_fake(x, offs, packed, scales, zeros, bits, expert_bits, slot):
    validate("mixed_width_grouped_mm", x, offs, packed, scales, zeros, bits, expert_bits, slot, index_name="offs")
    return x.new_empty(x.shape[0], packed[0].shape[1])
