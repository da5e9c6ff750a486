"""A 2-D linear weight ``[N, K]`` stored as packed b-bit codes with group-wise float16 scale/zero.

Unlike torchao's ``IntxUnpackedToInt8Tensor`` (one int8 per value) the codes are bit-packed
(``moe_export.quant.packing`` layout), so a 3-bit weight costs 3 bits a value in memory and on disk.
Used for SwitchTransformers-style experts (one ``nn.Linear`` per expert), for non-expert weights the
plan quantizes, and as what ``select`` on a mixed-width expert stack returns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from moe_export.quant.base import QuantizedWeight, resolve_group_size
from moe_export.quant.packing import pack
from moe_export.tensors.functional import dequantize_packed, packed_linear

aten = torch.ops.aten

__all__ = ["PackedLinearWeight"]


class PackedLinearWeight(TorchAOBaseTensor):
    """``packed`` uint8 ``[N, K*b/8]``, ``scale`` float16 ``[N, K/g]``, ``zero`` float16 ``[N, K/g]`` or None.

    ``transposed`` marks a ``.t()`` view (logical shape ``[K, N]``); the bytes never move.
    """

    tensor_data_names = ["packed", "scale"]
    tensor_attribute_names = ["bits", "group_size", "transposed", "dtype"]
    optional_tensor_data_names = ["zero"]

    def __new__(cls, packed, scale, bits, group_size, transposed, dtype, zero=None):
        n, k = packed.shape[0], packed.shape[1] * 8 // bits
        shape = (k, n) if transposed else (n, k)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(self, packed, scale, bits, group_size, transposed, dtype, zero=None):
        super().__init__()
        self.packed = packed
        self.scale = scale
        self.zero = zero
        self.bits = bits
        self.group_size = group_size
        self.transposed = transposed
        self._flat = TorchAOBaseTensor.__tensor_flatten__(self)

    def __tensor_flatten__(self):
        # built once: torch.compile's guards call this twice per subclass parameter on every call
        names, attrs = self._flat
        return list(names), dict(attrs)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> "PackedLinearWeight":
        return cls(pack(qw.qdata, qw.bits), qw.scale, qw.bits, qw.group_size, False, dtype, zero=qw.zero)

    @classmethod
    def from_hp(cls, weight: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False,
                quantizer=None) -> "PackedLinearWeight":
        """Quantize a float ``[N, K]`` weight (RTN unless a ``Quantizer`` is given)."""
        if quantizer is None:
            from moe_export.quant.rtn import RTNQuantizer

            quantizer = RTNQuantizer()
        resolve_group_size(group_size, weight.shape[-1])
        return cls.from_quantized(quantizer.quantize(weight, bits, group_size, symmetric), weight.dtype)

    # -- views of the stored data ---------------------------------------------------------------------
    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 8 // self.bits

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def to_quantized(self) -> QuantizedWeight:
        from moe_export.quant.packing import unpack

        return QuantizedWeight(unpack(self.packed, self.bits, self.in_features), self.scale, self.zero, self.bits,
                               self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize_packed(self.packed, self.scale, self.zero, self.bits, self.in_features, dtype or self.dtype)
        return w.t() if self.transposed else w

    def nbytes_stored(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero) if t is not None)

    def _rows(self, rows) -> "PackedLinearWeight":
        z = None if self.zero is None else self.zero[rows]
        return PackedLinearWeight(self.packed[rows], self.scale[rows], self.bits, self.group_size, self.transposed,
                                  self.dtype, zero=z)


implements = PackedLinearWeight.implements
implements_torch_function = PackedLinearWeight.implements_torch_function


@implements_torch_function([F.linear, torch.nn.functional.linear])
@implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, PackedLinearWeight) or w.transposed:
        raise NotImplementedError("linear expects a PackedLinearWeight [N, K] as its weight (not a transposed view)")
    return packed_linear(x, w.packed, w.scale, w.zero, w.bits, w.in_features, bias)


@implements([aten.t.default])
def _(func, types, args, kwargs):
    w = args[0]
    return PackedLinearWeight(w.packed, w.scale, w.bits, w.group_size, not w.transposed, w.dtype, zero=w.zero)


@implements([aten.transpose.int])
def _(func, types, args, kwargs):
    w, d0, d1 = args[0], args[1] % 2, args[2] % 2
    if d0 == d1:
        return w
    return PackedLinearWeight(w.packed, w.scale, w.bits, w.group_size, not w.transposed, w.dtype, zero=w.zero)


@implements([aten.mm.default, aten.matmul.default])
def _(func, types, args, kwargs):
    a, b = args[0], args[1]
    a = a.dequantize() if isinstance(a, PackedLinearWeight) else a
    b = b.dequantize() if isinstance(b, PackedLinearWeight) else b
    return func(a, b)


@implements([aten.addmm.default])
def _(func, types, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    if isinstance(b, PackedLinearWeight) and b.transposed:
        # x @ W.t() + bias: the decomposition of linear
        return packed_linear(a, b.packed, b.scale, b.zero, b.bits, b.in_features, bias)
    a = a.dequantize() if isinstance(a, PackedLinearWeight) else a
    b = b.dequantize() if isinstance(b, PackedLinearWeight) else b
    return func(bias, a, b, **kwargs)


@implements([aten.slice.Tensor])
def _(func, types, args, kwargs):
    w, dim = args[0], args[1] if len(args) > 1 else 0
    start, end, step = (list(args[2:]) + [None, None, 1])[:3]
    if w.transposed:
        dim = 1 - (dim % 2)
    if dim % 2 != 0:
        raise NotImplementedError("PackedLinearWeight supports slicing output rows only; dequantize() first")
    return w._rows(slice(start, end, step))


@implements([aten.select.int])
def _(func, types, args, kwargs):
    w, dim, index = args
    return func(w.dequantize(), dim, index)


@implements([aten.index.Tensor])
def _(func, types, args, kwargs):
    w, indices = args
    return func(w.dequantize(), indices)


@implements([aten.embedding.default])
def _(func, types, args, kwargs):
    w, ids = args[0], args[1]
    if w.transposed:
        raise NotImplementedError("embedding on a transposed PackedLinearWeight")
    # gather the packed rows first, unpack only what is looked up
    flat = ids.reshape(-1)
    z = None if w.zero is None else w.zero[flat]
    rows = dequantize_packed(w.packed[flat], w.scale[flat], z, w.bits, w.in_features, w.dtype)
    return rows.reshape(*ids.shape, w.in_features)
