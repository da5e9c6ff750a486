"""The ``moe_export`` custom ops the export forms trace, defined by :func:`define_ops` (explicit, idempotent; every
export module that emits them calls it when it is built) instead of at import:

    moe_export::gather_dequant(packed, scale, zero?, index, lut, bits, k) -> [S, N, K]
    moe_export::gather_dequant_codes(packed, scale, zero_codes?, index, lut, bits, k) -> [S, N, K]
    moe_export::matmul_nbits(x, packed, scale, zero?, lut, bits, k, accuracy_level) -> [T, N]

Their only kernels are CompositeImplicitAutograd, written with the layout's exportable unpack and dequantize
(``runtime.layout.unpack_codes`` / ``dequantize``): ExecuTorch sees plain aten ops after decomposition, while the
ONNX exporter keeps the ops and translates them to ``com.microsoft::GatherBlockQuantized`` / ``MatMulNBits``.

The native ``.pte`` ops, defined by :func:`define_native_ops` (``export.native`` calls it), stay whole in the
program: each has a functional form (what ``torch.export`` traces: a CPU kernel and a fake one) and an ``.out``
form (what ExecuTorch runs: the C++ kernels of ``moe_export/kernels/et_ops.cpp``, loaded by ``moe_export.kernels.et_native``):

    moe_export::mixed_width_moe(x [T, H], topk_ids [T, k], topk_weights [T, k], up_packed[], up_scale[],
                                up_zero?[], down_packed[], down_scale[], down_zero?[], bits[], expert_bits[E],
                                slots[E], accuracy) -> [T, H]        the routed SwiGLU experts of one MoE block
    moe_export::packed_linear(x [..., K], packed [N, K*b/8], scale, zero?, bits, accuracy) -> [..., N]
    moe_export::packed_embedding(ids [...], packed [V, H*b/8], scale, zero?, bits) -> [..., H]

The lists hold one entry per width group (``bits`` ascending), in the layout of docs/architecture.md. Their CPU
kernels are the compiled path's: the torch extension (``moe_export/kernels/cpu_ops``) where it is built, else the
plain-torch reference (``moe_export/kernels/reference``, ``runtime.layout``).
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


# ------------------------------------------------------------------------------------------ native .pte ops

_NATIVE_SCHEMAS = {
    "mixed_width_moe": "mixed_width_moe(Tensor x, Tensor topk_ids, Tensor topk_weights, Tensor[] up_packed, "
                       "Tensor[] up_scale, Tensor?[] up_zero, Tensor[] down_packed, Tensor[] down_scale, "
                       "Tensor?[] down_zero, int[] bits, int[] expert_bits, int[] slots, int accuracy=0) -> Tensor",
    "packed_linear": "packed_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero, int bits, int accuracy=0) "
                     "-> Tensor",
    "packed_embedding": "packed_embedding(Tensor ids, Tensor packed, Tensor scale, Tensor? zero, int bits) -> Tensor",
}
# Accuracy of the native kernels (the kernel core's Accuracy): 0 = float32 activations (exact up to summation
# order), 1 = activations quantized to int8 per group block (integer dot products).
NATIVE_ACCURACY = {"exact": 0, "int8": 1}
_NATIVE_LIB: torch.library.Library | None = None


def _native_fail(op: str, msg: str):
    raise ValueError(f"moe_export::{op}: {msg}")


def _check_accuracy(op: str, accuracy: int) -> None:
    if accuracy not in NATIVE_ACCURACY.values():
        _native_fail(op, f"accuracy must be one of {NATIVE_ACCURACY} (by value), got {accuracy}")


def _check_moe(x, topk_ids, topk_weights, up_packed, up_scale, up_zero, down_packed, down_scale, down_zero, bits,
               expert_bits, slots, accuracy) -> None:
    from moe_export.kernels.cpu_ops import check_moe_ffn

    op = "mixed_width_moe"
    check_moe_ffn(op, x, topk_ids, topk_weights, expert_bits, slots, bits, up_packed, up_scale, up_zero, down_packed,
                  down_scale, down_zero)
    # what the ExecuTorch kernel reads besides: float32 weights, one group per width, slots numbering each group
    if topk_weights.dtype != torch.float32:
        _native_fail(op, f"topk_weights must be float32, got {topk_weights.dtype}")
    if list(bits) != sorted(set(bits)):
        _native_fail(op, f"bits must be distinct and ascending, got {list(bits)}")
    for i, b in enumerate(bits):
        members = [s for e, s in zip(expert_bits, slots) if e == b]
        if sorted(members) != list(range(up_packed[i].shape[0])):
            _native_fail(op, f"slots of the {b}-bit experts must number its {up_packed[i].shape[0]} rows, got {members}")
    _check_accuracy(op, accuracy)


def _check_linear(x, packed, scale, zero, bits, accuracy) -> None:
    from moe_export.kernels.cpu_ops import check_packed_linear

    check_packed_linear("packed_linear", x, packed, scale, zero, bits)
    _check_accuracy("packed_linear", accuracy)


def _check_embedding(ids, packed, scale, zero, bits) -> None:
    from moe_export.kernels.cpu_ops import _check_group

    op = "packed_embedding"
    if ids.dtype != torch.int64:
        _native_fail(op, f"ids must be int64, got {ids.dtype}")
    if packed.dim() != 2 or packed.dtype != torch.uint8:
        _native_fail(op, f"packed must be uint8 [V, H*b/8], got {packed.dtype} {tuple(packed.shape)}")
    _check_group(op, "table", packed, scale, zero, bits, packed.shape[1] * 8 // bits, 2)


def _moe_reference(x, topk_ids, topk_weights, up, down, bits, expert_bits, slots):
    """Plain torch: each (token, expert) pair through its dequantized experts, weighted sum over the top k."""
    from moe_export.kernels.reference import gather_mm

    t, k = topk_ids.shape
    eb, sl = torch.tensor(expert_bits), torch.tensor(slots)
    ids = topk_ids.reshape(-1)  # [S = T*k]
    h = gather_mm(x.repeat_interleave(k, dim=0), ids, *up, bits, eb, sl)  # [S, 2I]
    gate, upv = h.chunk(2, dim=-1)
    y = gather_mm(F.silu(gate) * upv, ids, *down, bits, eb, sl)  # [S, H]
    return (y * topk_weights.reshape(-1, 1)).view(t, k, -1).sum(1)  # [T, H]


def _torch_extension(op: str, x, bits, accuracy: int) -> bool:
    """Whether the torch extension (the compiled path's C++ over the same kernel core) takes the call; int8
    accuracy exists only there."""
    from moe_export.kernels import cpu_ops

    if set(bits) <= set(cpu_ops.FUSED_WIDTHS) and cpu_ops.fused_runs_on(x):
        return True
    if accuracy != NATIVE_ACCURACY["exact"]:
        _native_fail(op, "int8 accuracy needs the C++ CPU kernel (moe_export.kernels.cpu_ops), which is not built")
    return False


def native_mixed_width_moe(x, topk_ids, topk_weights, up_packed, up_scale, up_zero, down_packed, down_scale,
                           down_zero, bits, expert_bits, slots, accuracy=0):
    _check_moe(x, topk_ids, topk_weights, up_packed, up_scale, up_zero, down_packed, down_scale, down_zero, bits,
               expert_bits, slots, accuracy)
    if _torch_extension("mixed_width_moe", x, bits, accuracy):
        return torch.ops.moe_export.cpu_moe_ffn(x, topk_ids, topk_weights, list(expert_bits), list(slots), list(bits),
                                                up_packed, up_scale, up_zero, down_packed, down_scale, down_zero,
                                                accuracy)
    return _moe_reference(x, topk_ids, topk_weights, (up_packed, up_scale, up_zero),
                          (down_packed, down_scale, down_zero), list(bits), expert_bits, slots)


def native_packed_linear(x, packed, scale, zero, bits, accuracy=0):
    from moe_export.runtime.dispatch import packed_linear

    _check_linear(x, packed, scale, zero, bits, accuracy)
    if accuracy != NATIVE_ACCURACY["exact"] and _torch_extension("packed_linear", x, (bits,), accuracy):
        return torch.ops.moe_export.cpu_packed_linear(x, packed, scale, zero, bits, accuracy)
    return packed_linear(x, packed, scale, zero, bits, x.shape[-1])


def native_packed_embedding(ids, packed, scale, zero, bits):
    from moe_export.runtime.layout import lookup_rows

    _check_embedding(ids, packed, scale, zero, bits)
    return lookup_rows(ids, packed, scale, zero, bits, packed.shape[1] * 8 // bits)


def _moe_fake(x, topk_ids, topk_weights, up_packed, up_scale, up_zero, down_packed, down_scale, down_zero, bits,
              expert_bits, slots, accuracy=0):
    _check_moe(x, topk_ids, topk_weights, up_packed, up_scale, up_zero, down_packed, down_scale, down_zero, bits,
               expert_bits, slots, accuracy)
    return x.new_empty(x.shape)


def _linear_fake(x, packed, scale, zero, bits, accuracy=0):
    _check_linear(x, packed, scale, zero, bits, accuracy)
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _embedding_fake(ids, packed, scale, zero, bits):
    _check_embedding(ids, packed, scale, zero, bits)
    return scale.new_empty(*ids.shape, packed.shape[1] * 8 // bits, dtype=torch.float32)


_NATIVE_IMPLS = {
    "mixed_width_moe": (native_mixed_width_moe, _moe_fake),
    "packed_linear": (native_packed_linear, _linear_fake),
    "packed_embedding": (native_packed_embedding, _embedding_fake),
}


def _out_variant(schema: str) -> str:
    """``name(args) -> Tensor`` -> ``name.out(args, *, Tensor(a!) out) -> Tensor(a!)``: the form ExecuTorch runs."""
    head, _, rest = schema.partition("(")
    args = rest.rsplit(") -> Tensor", 1)[0]
    return f"{head}.out({args}, *, Tensor(a!) out) -> Tensor(a!)"


def _with_out(fn):
    def out_kernel(*args, out):
        res = fn(*args)
        out.resize_(res.shape)
        return out.copy_(res)

    return out_kernel


def define_native_ops() -> None:
    """Define the native ``.pte`` ops (functional + ``.out``, CPU and Meta kernels) once per process."""
    global _NATIVE_LIB
    with _lock:
        if _NATIVE_LIB is not None:
            return
        lib = torch.library.Library("moe_export", "FRAGMENT")
        for name, schema in _NATIVE_SCHEMAS.items():
            kernel, fake = _NATIVE_IMPLS[name]
            lib.define(schema)
            lib.define(_out_variant(schema))
            lib.impl(name, kernel, "CPU")
            lib.impl(name, fake, "Meta")
            lib.impl(f"{name}.out", _with_out(kernel), "CPU")
            lib.impl(f"{name}.out", _with_out(fake), "Meta")
        _NATIVE_LIB = lib
