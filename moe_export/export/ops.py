"""The ``moe_export`` custom ops the export forms trace, defined by :func:`define_ops` (explicit, idempotent; every
export module that emits them calls it when it is built) instead of at import:

    moe_export::gather_dequant(packed, scale, zero?, index, lut, bits, k) -> [S, N, K]
    moe_export::gather_dequant_codes(packed, scale, zero_codes?, index, lut, bits, k) -> [S, N, K]
    moe_export::matmul_nbits(x, packed, scale, zero?, lut, bits, k, accuracy_level) -> [T, N]

Their only kernels are CompositeImplicitAutograd, written with the layout's exportable unpack and dequantize
(``runtime.layout.unpack_codes`` / ``dequantize``): ExecuTorch sees plain aten ops after decomposition, while the
ONNX exporter keeps the ops and translates them to ``com.microsoft::GatherBlockQuantized`` / ``MatMulNBits``.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from moe_export.runtime.layout import dequantize, dequantize_rows, unpack_codes

_SCHEMAS = {
    "gather_dequant": "gather_dequant(Tensor packed, Tensor scale, Tensor? zero, Tensor index, Tensor lut, int bits, "
                      "int k) -> Tensor",
    # Same, with integer zero points stored as packed b-bit codes (uint8 [E, N, ceil(G*b/8)]): the layout of
    # onnxruntime's GatherBlockQuantized, which the ONNX exporter maps this op to.
    "gather_dequant_codes": "gather_dequant_codes(Tensor packed, Tensor scale, Tensor? zero_codes, Tensor index, "
                            "Tensor lut, int bits, int k) -> Tensor",
    "matmul_nbits": "matmul_nbits(Tensor x, Tensor packed, Tensor scale, Tensor? zero, Tensor lut, int bits, int k, "
                    "int accuracy_level) -> Tensor",
}
_LIB: torch.library.Library | None = None
_lock = threading.Lock()


def gather_dequant(packed, scale, zero, index, lut, bits: int, k: int):
    # Gather bytes first: the float weight exists only for the routed rows, and no cast of a whole
    # constant table is left for an exporter to fold into a float initializer.
    z = None if zero is None else zero.index_select(0, index)
    return dequantize_rows(packed.index_select(0, index), scale.index_select(0, index), z, lut, bits, k)


def gather_dequant_codes(packed, scale, zero_codes, index, lut, bits: int, k: int):
    z = None
    if zero_codes is not None:
        zc = zero_codes.index_select(0, index)  # [S, N, ceil(G*b/8)]
        z = unpack_codes(zc, lut, bits, zc.shape[-1] * 8 // bits)[..., : scale.shape[-1]]  # [S, N, G]
    return dequantize_rows(packed.index_select(0, index), scale.index_select(0, index), z, lut, bits, k)


def matmul_nbits(x, packed, scale, zero, lut, bits: int, k: int, accuracy_level: int):
    # x [T, K]; packed uint8 [N, G, g*b/8]; scale f16 [N, G]; zero uint8 codes [N, ceil(G*b/8)], float [N, G] or None
    n, g_count = scale.shape
    q = unpack_codes(packed.reshape(n, -1), lut, bits, k)  # [N, K]
    if zero is None:
        z = float(1 << (bits - 1))
    elif zero.dtype == torch.uint8:
        z = unpack_codes(zero, lut, bits, zero.shape[-1] * 8 // bits)[:, :g_count]  # [N, G]
    else:
        z = zero
    return F.linear(x, dequantize(q, scale, z, torch.float32))  # [T, N]


def define_ops() -> None:
    """Define the three ops in the ``moe_export`` namespace (once per process)."""
    global _LIB
    with _lock:
        if _LIB is not None:
            return
        lib = torch.library.Library("moe_export", "FRAGMENT")  # other modules define ops in this namespace too
        for name, schema in _SCHEMAS.items():
            lib.define(schema)
            lib.impl(name, globals()[name], "CompositeImplicitAutograd")
        _LIB = lib
