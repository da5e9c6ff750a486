"""Bit-exact packing of unsigned b-bit integers (1 <= b <= 8) into bytes.

Layout: an LSB-first bit stream along the last dim. Value j of a row occupies bits
[j*b, (j+1)*b) of the row's byte string, little-endian. Every 8 values fill exactly b bytes,
so 3-bit weights cost 3 bits, not 4. For b in {1, 2, 4} this is the usual "element 0 in the
low bits" layout that ONNX INT4/INT2 and onnxruntime's MatMulNBits use.

Only plain aten ops are used so the same code runs in eager, under torch.compile and in an
exported graph.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_size(k: int, bits: int) -> int:
    """Bytes a row of ``k`` b-bit values takes."""
    _check(k, bits)
    return k * bits // 8


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q``: uint8 ``[..., K]`` with values in ``[0, 2**bits)`` -> uint8 ``[..., K * bits // 8]``."""
    k = q.shape[-1]
    _check(k, bits)
    if q.dtype != torch.uint8:
        raise TypeError(f"pack expects uint8 values, got {q.dtype}")
    if bits == 8:
        return q.clone()
    octets = q.reshape(*q.shape[:-1], k // 8, 8).to(torch.int64)  # [..., K/8, 8]
    shifts = torch.arange(8, device=q.device, dtype=torch.int64) * bits
    word = (octets << shifts).sum(-1, keepdim=True)  # [..., K/8, 1], 8*bits <= 64 bits
    byte_shifts = torch.arange(bits, device=q.device, dtype=torch.int64) * 8
    out = (word >> byte_shifts) & 0xFF  # [..., K/8, bits]
    return out.to(torch.uint8).reshape(*q.shape[:-1], k * bits // 8)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 ``[..., K * bits // 8]`` -> uint8 ``[..., K]``."""
    _check(k, bits)
    if packed.shape[-1] != k * bits // 8:
        raise ValueError(f"expected {k * bits // 8} packed bytes per row for K={k} at {bits} bits, got {packed.shape[-1]}")
    if bits == 8:
        return packed
    chunks = packed.reshape(*packed.shape[:-1], k // 8, bits).to(torch.int64)  # [..., K/8, bits]
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (chunks << byte_shifts).sum(-1, keepdim=True)  # [..., K/8, 1]
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    out = (word >> shifts) & ((1 << bits) - 1)  # [..., K/8, 8]
    return out.to(torch.uint8).reshape(*packed.shape[:-1], k)


def _check(k: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if k % 8:
        raise ValueError(f"the packed dim must be a multiple of 8, got {k}")
