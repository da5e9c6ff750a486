"""torchao tensor subclasses holding packed int-N weights: thin holders of one :class:`~moe_export.runtime.layout.WidthGroups`.

* :class:`MixedWidthExpertsTensor`: a fused expert weight ``[E, N, K]`` whose experts have different widths. Its
  inner tensors are the layout's width groups, flattened under fixed names: for every width b present
  ``packed_b``, ``scale_b``, ``zero_b`` (asymmetric only), plus ``expert_bits`` (int64 ``[E]``) and ``slot``
  (int64 ``[E]``). The same tables are kept as Python tuples (``bit_widths``, ``slots``) so that selecting one
  expert by a Python int needs no data-dependent op. Every shape is static, so an op on routed expert ids
  gathers per width group (a dummy slot where the expert is of another width) and masks: exportable, one
  code path per width.
* :class:`PackedLinearWeight`: one 2-D linear weight ``[N, K]`` (a one-expert layout), for SwitchTransformers-
  style experts (one ``nn.Linear`` per expert), the non-expert weights the plan quantizes, and what ``select`` on
  an expert stack returns.

The flattened names, attributes and class names are the checkpoint format (``moe_export.checkpoint``); they are
imported as ``moe_export.tensors.*``. How a layer runs on them is ``runtime.dispatch``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from moe_export.quant.base import QuantizedWeight
from moe_export.runtime.dispatch import packed_linear
from moe_export.runtime.layout import SUPPORTED_BITS, WidthGroups, dequantize_packed, lookup_rows, pack, slot_numbering

aten = torch.ops.aten

__all__ = ["MixedWidthExpertsTensor", "PackedLinearWeight"]

_GROUP_NAMES = [f"{kind}_{b}" for kind in ("packed", "scale", "zero") for b in SUPPORTED_BITS]


class _PackedTensor(TorchAOBaseTensor):
    """The flatten cache both subclasses share."""

    def _cache_flatten(self):
        self._flat = TorchAOBaseTensor.__tensor_flatten__(self)

    def __tensor_flatten__(self):
        # torch.compile's guards flatten every subclass parameter twice per call; torchao's version walks all
        # optional names each time (~0.5 ms a step on a 4-layer model with the 24 group names). The inner
        # tensors never change after construction, so the answer is built once.
        names, attrs = self._flat
        return list(names), dict(attrs)


def _to_quantized(layout: WidthGroups) -> list[QuantizedWeight]:
    """One ``QuantizedWeight`` (unpacked codes) per expert."""
    return [QuantizedWeight(layout.codes(e), *layout.expert(e)[1:], layout.group_size) for e in range(layout.num_experts)]


def _default_quantizer(quantizer):
    if quantizer is not None:
        return quantizer
    from moe_export.quant.rtn import RTNQuantizer

    return RTNQuantizer()


# ---------------------------------------------------------------------------------------- PackedLinearWeight


class PackedLinearWeight(_PackedTensor):
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
        self._cache_flatten()

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> "PackedLinearWeight":
        """From one ``QuantizedWeight`` (unpacked codes)."""
        return cls(pack(qw.qdata, qw.bits), qw.scale, qw.bits, qw.group_size, False, dtype, zero=qw.zero)

    @classmethod
    def from_hp(cls, weight: torch.Tensor, bits: int, group_size: int | None = 128, symmetric: bool = False,
                quantizer=None, dtype: torch.dtype | None = None) -> "PackedLinearWeight":
        """Quantize a float ``[N, K]`` weight (RTN unless a ``Quantizer`` is given); ``dtype`` defaults to the
        weight's."""
        qw = _default_quantizer(quantizer).quantize(weight, bits, group_size, symmetric)
        return cls.from_quantized(qw, dtype or weight.dtype)

    # -- views of the stored data ---------------------------------------------------------------------
    def width_groups(self) -> WidthGroups:
        """This weight as a one-expert layout (no copy of its bytes)."""
        z = None if self.zero is None else self.zero.unsqueeze(0)
        return WidthGroups({self.bits: self.packed.unsqueeze(0)}, {self.bits: self.scale.unsqueeze(0)},
                           {self.bits: z}, (self.bits,), self.group_size)

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 8 // self.bits

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def to_quantized(self) -> QuantizedWeight:
        return _to_quantized(self.width_groups())[0]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = dequantize_packed(self.packed, self.scale, self.zero, self.bits, self.in_features, dtype or self.dtype)
        return w.t() if self.transposed else w

    def nbytes_stored(self) -> int:
        return self.width_groups().nbytes()

    def _rows(self, rows) -> "PackedLinearWeight":
        z = None if self.zero is None else self.zero[rows]
        return PackedLinearWeight(self.packed[rows], self.scale[rows], self.bits, self.group_size, self.transposed,
                                  self.dtype, zero=z)

    def _flip(self) -> "PackedLinearWeight":
        return PackedLinearWeight(self.packed, self.scale, self.bits, self.group_size, not self.transposed,
                                  self.dtype, zero=self.zero)


def _linear(x, w, bias):
    return packed_linear(x, w.packed, w.scale, w.zero, w.bits, w.in_features, bias)


def _plain_linear(t):
    return t.dequantize() if isinstance(t, PackedLinearWeight) else t


@PackedLinearWeight.implements_torch_function([F.linear, torch.nn.functional.linear])
@PackedLinearWeight.implements(aten.linear.default)
def _(func, types, args, kwargs):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(w, PackedLinearWeight) or w.transposed:
        raise NotImplementedError("linear expects a PackedLinearWeight [N, K] as its weight (not a transposed view)")
    return _linear(x, w, bias)


def _to_copy(t, args, kwargs):
    """``t.to(device=..., dtype=...)`` for either subclass: the stored parts move to ``device``; ``dtype`` is the
    compute dtype only (what dequantize and the matmuls return). The packed codes stay uint8 and the scales and
    zeros float16, so a quantized bfloat16 model's ``.float()`` computes in float32 from the same bytes."""
    to = t._get_to_kwargs(*args, **kwargs)
    names, attrs = t.__tensor_flatten__()
    parts = {n: getattr(t, n).to(to["device"], non_blocking=to["non_blocking"]) for n in names}
    attrs = {**attrs, "dtype": to["dtype"]}
    return type(t).__tensor_unflatten__(parts, attrs, None, None)


@PackedLinearWeight.implements([aten._to_copy.default])
def _(func, types, args, kwargs):
    return _to_copy(args[0], args[1:], kwargs)


@PackedLinearWeight.implements([aten.t.default])
def _(func, types, args, kwargs):
    return args[0]._flip()


@PackedLinearWeight.implements([aten.transpose.int])
def _(func, types, args, kwargs):
    w, d0, d1 = args[0], args[1] % 2, args[2] % 2
    return w if d0 == d1 else w._flip()


@PackedLinearWeight.implements([aten.mm.default, aten.matmul.default])
def _(func, types, args, kwargs):
    return func(_plain_linear(args[0]), _plain_linear(args[1]))


@PackedLinearWeight.implements([aten.addmm.default])
def _(func, types, args, kwargs):
    bias, a, b = args[0], args[1], args[2]
    if isinstance(b, PackedLinearWeight) and b.transposed:
        return _linear(a, b, bias)  # x @ W.t() + bias: the decomposition of linear
    return func(bias, _plain_linear(a), _plain_linear(b), **kwargs)


@PackedLinearWeight.implements([aten.slice.Tensor])
def _(func, types, args, kwargs):
    w, dim = args[0], args[1] if len(args) > 1 else 0
    start, end, step = (list(args[2:]) + [None, None, 1])[:3]
    if w.transposed:
        dim = 1 - (dim % 2)
    if dim % 2 != 0:
        raise NotImplementedError("PackedLinearWeight supports slicing output rows only; dequantize() first")
    return w._rows(slice(start, end, step))


@PackedLinearWeight.implements([aten.select.int])
def _(func, types, args, kwargs):
    w, dim, index = args
    return func(w.dequantize(), dim, index)


@PackedLinearWeight.implements([aten.index.Tensor])
def _(func, types, args, kwargs):
    w, indices = args
    return func(w.dequantize(), indices)


@PackedLinearWeight.implements([aten.embedding.default])
def _(func, types, args, kwargs):
    w, ids = args[0], args[1]
    if w.transposed:
        raise NotImplementedError("embedding on a transposed PackedLinearWeight")
    return lookup_rows(ids, w.packed, w.scale, w.zero, w.bits, w.in_features, w.dtype)


# ---------------------------------------------------------------------------------------- MixedWidthExpertsTensor


class MixedWidthExpertsTensor(_PackedTensor):
    tensor_data_names = ["expert_bits", "slot"]
    tensor_attribute_names = ["bit_widths", "group_size", "transposed", "dtype"]
    optional_tensor_data_names = _GROUP_NAMES

    def __new__(cls, expert_bits, slot, bit_widths, group_size, transposed, dtype, *group_tensors, **groups):
        groups.update(zip(_GROUP_NAMES, group_tensors))  # torchao's _to_copy passes optional tensors positionally
        b0 = bit_widths[0]
        packed = groups[f"packed_{b0}"]
        n, k = packed.shape[1], packed.shape[2] * 8 // b0
        shape = (len(bit_widths), k, n) if transposed else (len(bit_widths), n, k)
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=packed.device, requires_grad=False)

    def __init__(self, expert_bits, slot, bit_widths, group_size, transposed, dtype, *group_tensors, **groups):
        super().__init__()
        groups.update(zip(_GROUP_NAMES, group_tensors))
        self.expert_bits = expert_bits
        self.slot = slot
        self.bit_widths = tuple(int(b) for b in bit_widths)
        # plain attributes, not properties: compiled graphs read them, and dynamo guards on what they read
        # on every call (a property would be re-run by each guard check)
        self.slots, self.widths = slot_numbering(self.bit_widths)
        self.group_size = group_size
        self.transposed = transposed
        for name in _GROUP_NAMES:
            setattr(self, name, groups.get(name))
        self._cache_flatten()

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_layout(cls, layout: WidthGroups, dtype: torch.dtype = torch.float32, transposed: bool = False):
        groups = {}
        for b, p, s, z in layout.groups():
            groups[f"packed_{b}"], groups[f"scale_{b}"] = p, s
            if z is not None:
                groups[f"zero_{b}"] = z
        dev = layout.packed[layout.widths[0]].device
        return cls(torch.tensor(layout.bit_widths, dtype=torch.int64, device=dev),
                   torch.tensor(layout.slots, dtype=torch.int64, device=dev),
                   layout.bit_widths, layout.group_size, transposed, dtype, **groups)

    @classmethod
    def from_quantized(cls, qweights: list[QuantizedWeight], dtype: torch.dtype = torch.float32):
        """One ``QuantizedWeight`` ``[N, K]`` per expert, in expert order."""
        return cls.from_layout(WidthGroups.from_quantized(qweights), dtype)

    @classmethod
    def from_packed_experts(cls, experts: list[PackedLinearWeight], dtype, transposed=False):
        """One :class:`PackedLinearWeight` per expert, in expert order (their bytes are stacked, not repacked)."""
        layout = WidthGroups.from_experts([(w.packed, w.scale, w.zero, w.bits) for w in experts], experts[0].group_size)
        return cls.from_layout(layout, dtype, transposed)

    @classmethod
    def from_hp(cls, weight: torch.Tensor, bits, group_size: int | None = 128, symmetric: bool = False,
                quantizer=None, dtype: torch.dtype | None = None) -> "MixedWidthExpertsTensor":
        """Quantize a float ``[E, N, K]`` stack, expert e at ``bits[e]`` (or one width for all; RTN unless a
        ``Quantizer`` is given)."""
        q = _default_quantizer(quantizer)
        bits = [bits] * weight.shape[0] if isinstance(bits, int) else list(bits)
        if len(bits) != weight.shape[0]:
            raise ValueError(f"the stack has {weight.shape[0]} experts but {len(bits)} bit widths were given")
        qws = [q.quantize(weight[e], b, group_size, symmetric) for e, b in enumerate(bits)]
        return cls.from_quantized(qws, dtype or weight.dtype)

    # -- what consumers read --------------------------------------------------------------------------
    def width_groups(self) -> WidthGroups:
        """The width groups this tensor holds (the same tensors, no copy)."""
        return WidthGroups({b: getattr(self, f"packed_{b}") for b in self.widths},
                           {b: getattr(self, f"scale_{b}") for b in self.widths},
                           {b: getattr(self, f"zero_{b}") for b in self.widths}, self.bit_widths, self.group_size)

    @property
    def num_experts(self) -> int:
        return len(self.bit_widths)

    @property
    def symmetric(self) -> bool:
        return getattr(self, f"zero_{self.bit_widths[0]}") is None

    @property
    def out_features(self) -> int:
        return getattr(self, f"packed_{self.bit_widths[0]}").shape[1]

    @property
    def in_features(self) -> int:
        b = self.bit_widths[0]
        return getattr(self, f"packed_{b}").shape[2] * 8 // b

    def groups(self):
        """``(bits, packed_b, scale_b, zero_b)`` for every width present, ascending."""
        for b in self.widths:
            yield b, getattr(self, f"packed_{b}"), getattr(self, f"scale_{b}"), getattr(self, f"zero_{b}")

    def expert(self, e: int) -> PackedLinearWeight:
        """Expert ``e`` as a 2-D packed weight (no copy of its bytes)."""
        b, s = self.bit_widths[e], self.slots[e]
        z = getattr(self, f"zero_{b}")
        return PackedLinearWeight(getattr(self, f"packed_{b}")[s], getattr(self, f"scale_{b}")[s], b, self.group_size,
                                  self.transposed, self.dtype, zero=None if z is None else z[s])

    def to_quantized(self) -> list[QuantizedWeight]:
        return _to_quantized(self.width_groups())

    def nbytes_stored(self) -> int:
        """Bytes of packed codes + scales + zeros (the int tables are not counted: 16 bytes an expert)."""
        return self.width_groups().nbytes()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts as float ``[E, N, K]`` (``[E, K, N]`` for a transposed view)."""
        w = self.width_groups().dequantize(dtype or self.dtype)
        return w.transpose(-2, -1) if self.transposed else w

    def dequantize_experts(self, expert_ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Float weights of the experts in ``expert_ids`` (any shape) -> ``[*ids.shape, N, K]``.

        Static shapes: per width group, gather the slot of every id (slot 0 where the id has another
        width), unpack only those packed bytes, and keep the rows whose width matches.
        """
        dtype = dtype or self.dtype
        flat = expert_ids.reshape(-1)  # [S]
        bits_of = self.expert_bits[flat]  # [S]
        slot_of = self.slot[flat]  # [S]
        out = None
        for b, p, s, z in self.groups():
            hit = bits_of == b  # [S]
            idx = torch.where(hit, slot_of, torch.zeros_like(slot_of))
            w = dequantize_packed(p[idx], s[idx], None if z is None else z[idx], b, self.in_features, dtype)
            w = w * hit.to(dtype)[:, None, None]  # [S, N, K]
            out = w if out is None else out + w
        out = out.reshape(*expert_ids.shape, *out.shape[-2:])
        return out.transpose(-2, -1) if self.transposed else out

    def _with(self, **changes) -> "MixedWidthExpertsTensor":
        kw = {name: getattr(self, name) for name in _GROUP_NAMES}
        base = dict(expert_bits=self.expert_bits, slot=self.slot, bit_widths=self.bit_widths,
                    group_size=self.group_size, transposed=self.transposed, dtype=self.dtype)
        base.update(changes)
        kw.update({k: v for k, v in changes.items() if k in _GROUP_NAMES})
        return MixedWidthExpertsTensor(base["expert_bits"], base["slot"], base["bit_widths"], base["group_size"],
                                       base["transposed"], base["dtype"], **kw)

    def _subset(self, experts: list[int]) -> "MixedWidthExpertsTensor":
        """A stack of the listed experts (Python ints), in that order."""
        if not experts:
            raise ValueError("an expert stack needs at least one expert")
        layout = self.width_groups()
        sub = WidthGroups.from_experts([layout.expert(e) for e in experts], self.group_size)
        return MixedWidthExpertsTensor.from_layout(sub, self.dtype, self.transposed)


def _plain(t):
    return t.dequantize() if isinstance(t, (MixedWidthExpertsTensor, PackedLinearWeight)) else t


@MixedWidthExpertsTensor.implements([aten._to_copy.default])
def _(func, types, args, kwargs):
    return _to_copy(args[0], args[1:], kwargs)


@MixedWidthExpertsTensor.implements([aten.select.int])
def _(func, types, args, kwargs):
    w, dim, index = args
    if dim % 3 != 0:
        return func(w.dequantize(), dim, index)
    e = index % w.num_experts
    return w.expert(e)


@MixedWidthExpertsTensor.implements([aten.index.Tensor])
def _(func, types, args, kwargs):
    w, indices = args
    if len(indices) >= 1 and indices[0] is not None and all(i is None for i in indices[1:]):
        return w.dequantize_experts(indices[0])  # the batched_mm gather: only the routed experts
    return func(w.dequantize(), indices)


@MixedWidthExpertsTensor.implements([aten.index_select.default])
def _(func, types, args, kwargs):
    w, dim, index = args
    if dim % 3 == 0:
        return w.dequantize_experts(index)
    return func(w.dequantize(), dim, index)


@MixedWidthExpertsTensor.implements([aten.transpose.int])
def _(func, types, args, kwargs):
    w, d0, d1 = args[0], args[1] % 3, args[2] % 3
    if {d0, d1} == {1, 2}:
        return w._with(transposed=not w.transposed)
    if d0 == d1:
        return w
    raise NotImplementedError("MixedWidthExpertsTensor can only swap its last two dims; dequantize() first")


@MixedWidthExpertsTensor.implements([aten.slice.Tensor])
def _(func, types, args, kwargs):
    w, dim = args[0], args[1] if len(args) > 1 else 0
    start, end, step = (list(args[2:]) + [None, None, 1])[:3]
    if dim % 3 != 0:
        return func(w.dequantize(), dim, start, end, step)
    experts = list(range(w.num_experts))[slice(start, end, step)]
    if experts == list(range(w.num_experts)):
        return w
    return w._subset(experts)


@MixedWidthExpertsTensor.implements([aten.bmm.default, aten.matmul.default])
def _(func, types, args, kwargs):
    return func(_plain(args[0]), _plain(args[1]))


@MixedWidthExpertsTensor.implements([aten._grouped_mm.default])
def _(func, types, args, kwargs):
    args = [_plain(a) for a in args]
    return func(*args, **kwargs)


_TRANSFORMERS_OPS_DONE = False


def register_transformers_ops() -> None:
    """Give transformers' ``grouped_mm`` fallback op (its CPU / compile route) float weights for a packed stack.
    Idempotent; called by ``moe_export.runtime.register``."""
    global _TRANSFORMERS_OPS_DONE
    if _TRANSFORMERS_OPS_DONE:
        return
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the op)

        op = torch.ops.transformers.grouped_mm_fallback.default
    except (ImportError, AttributeError, RuntimeError):
        return

    @MixedWidthExpertsTensor.implements([op])
    def _(func, types, args, kwargs):
        return func(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})

    _TRANSFORMERS_OPS_DONE = True
