"""A fused expert weight ``[E, N, K]`` whose experts have different bit widths, stored in width groups.

For every width b present: ``packed_b`` uint8 ``[E_b, N, K*b/8]``, ``scale_b`` float16 ``[E_b, N, K/g]``,
``zero_b`` float16 ``[E_b, N, K/g]`` (asymmetric only). ``expert_bits`` (int64 ``[E]``) and ``slot`` (int64
``[E]``, the expert's row inside its width group) say where expert e lives; the same tables are kept as
Python tuples (``bit_widths``, ``slots``) so that selecting one expert by a Python int needs no data-dependent op.

Every shape is static, so an op on routed expert ids gathers per width group (a dummy slot where the expert
is of another width) and masks: exportable, one code path per width.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torchao.utils import TorchAOBaseTensor

from moe_export.quant.base import QuantizedWeight
from moe_export.quant.packing import SUPPORTED_BITS, pack, unpack
from moe_export.tensors.functional import dequantize_packed
from moe_export.tensors.packed_linear_tensor import PackedLinearWeight

aten = torch.ops.aten

__all__ = ["MixedWidthExpertsTensor"]

_GROUP_NAMES = [f"{kind}_{b}" for kind in ("packed", "scale", "zero") for b in SUPPORTED_BITS]


class MixedWidthExpertsTensor(TorchAOBaseTensor):
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
        counts: dict[int, int] = {}
        slots = []
        for b in self.bit_widths:
            slots.append(counts.get(b, 0))
            counts[b] = slots[-1] + 1
        # a plain attribute, not a property: compiled graphs read it, and dynamo guards on what they read
        # on every call (a property would be re-run by each guard check)
        self.slots = tuple(slots)
        self.widths = tuple(sorted(counts))
        self.group_size = group_size
        self.transposed = transposed
        for name in _GROUP_NAMES:
            setattr(self, name, groups.get(name))
        self._flat = TorchAOBaseTensor.__tensor_flatten__(self)

    def __tensor_flatten__(self):
        # torch.compile's guards flatten every subclass parameter twice per call; torchao's version walks
        # all 24 optional group names each time (~0.5 ms a step on a 4-layer model). The inner tensors
        # never change after construction, so the answer is built once.
        names, attrs = self._flat
        return list(names), dict(attrs)

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qweights: list[QuantizedWeight], dtype: torch.dtype = torch.float32):
        """One ``QuantizedWeight`` ``[N, K]`` per expert, in expert order."""
        if not qweights:
            raise ValueError("from_quantized needs at least one expert")
        shapes = {tuple(q.shape) for q in qweights}
        sym = {q.symmetric for q in qweights}
        gs = {q.group_size for q in qweights}
        if len(shapes) != 1 or len(sym) != 1 or len(gs) != 1:
            raise ValueError(
                f"all experts of one stack must share shape, group size and symmetry; got shapes {sorted(shapes)}, "
                f"group sizes {sorted(gs, key=str)}, symmetric {sorted(sym)}"
            )
        bit_widths = tuple(q.bits for q in qweights)
        slots, groups, counts = [], {}, {}
        for q in qweights:
            slots.append(counts.get(q.bits, 0))
            counts[q.bits] = slots[-1] + 1
        for b in sorted(counts):
            members = [q for q in qweights if q.bits == b]
            groups[f"packed_{b}"] = torch.stack([pack(q.qdata, b) for q in members])  # [E_b, N, K*b/8]
            groups[f"scale_{b}"] = torch.stack([q.scale for q in members])  # [E_b, N, G]
            if not qweights[0].symmetric:
                groups[f"zero_{b}"] = torch.stack([q.zero for q in members])
        dev = qweights[0].qdata.device
        return cls(
            torch.tensor(bit_widths, dtype=torch.int64, device=dev),
            torch.tensor(slots, dtype=torch.int64, device=dev),
            bit_widths, qweights[0].group_size, False, dtype, **groups,
        )

    # -- what consumers read --------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.bit_widths)

    # ``slots`` (expert e's row inside its width group) and ``widths`` (the widths present, ascending) are
    # plain tuples set in __init__.

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

    def groups(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
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
        out = []
        for e in range(self.num_experts):
            w = self.expert(e)
            out.append(QuantizedWeight(unpack(w.packed, w.bits, self.in_features), w.scale, w.zero, w.bits,
                                       self.group_size))
        return out

    def nbytes_stored(self) -> int:
        """Bytes of packed codes + scales + zeros (the int tables are not counted: 16 bytes an expert)."""
        return sum(t.numel() * t.element_size() for _, *ts in self.groups() for t in ts if t is not None)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts as float ``[E, N, K]`` (``[E, K, N]`` for a transposed view)."""
        dtype = dtype or self.dtype
        parts = []
        for b, p, s, z in self.groups():
            parts.append(dequantize_packed(p, s, z, b, self.in_features, dtype))  # [E_b, N, K]
        # back to expert order: expert e is row slot[e] of its width group
        cat = torch.cat(parts)  # [E, N, K] in (width, slot) order
        offsets, start = {}, 0
        for b, p, _, _ in self.groups():
            offsets[b] = start
            start += p.shape[0]
        order = [offsets[b] + s for b, s in zip(self.bit_widths, self.slots)]
        w = cat[torch.tensor(order, device=cat.device)]
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
        return MixedWidthExpertsTensor.from_packed_experts([self.expert(e) for e in experts], self.dtype,
                                                           self.transposed)

    @classmethod
    def from_packed_experts(cls, experts: list[PackedLinearWeight], dtype, transposed=False):
        bit_widths = tuple(w.bits for w in experts)
        slots, counts, groups = [], {}, {}
        for b in bit_widths:
            slots.append(counts.get(b, 0))
            counts[b] = slots[-1] + 1
        for b in sorted(counts):
            members = [w for w in experts if w.bits == b]
            groups[f"packed_{b}"] = torch.stack([w.packed for w in members])
            groups[f"scale_{b}"] = torch.stack([w.scale for w in members])
            if members[0].zero is not None:
                groups[f"zero_{b}"] = torch.stack([w.zero for w in members])
        dev = experts[0].packed.device
        return cls(torch.tensor(bit_widths, dtype=torch.int64, device=dev),
                   torch.tensor(slots, dtype=torch.int64, device=dev),
                   bit_widths, experts[0].group_size, transposed, dtype, **groups)


implements = MixedWidthExpertsTensor.implements
implements_torch_function = MixedWidthExpertsTensor.implements_torch_function


def _plain(t):
    return t.dequantize() if isinstance(t, (MixedWidthExpertsTensor, PackedLinearWeight)) else t


@implements([aten.select.int])
def _(func, types, args, kwargs):
    w, dim, index = args
    if dim % 3 != 0:
        return func(w.dequantize(), dim, index)
    e = index % w.num_experts
    return w.expert(e)


@implements([aten.index.Tensor])
def _(func, types, args, kwargs):
    w, indices = args
    if len(indices) >= 1 and indices[0] is not None and all(i is None for i in indices[1:]):
        return w.dequantize_experts(indices[0])  # the batched_mm gather: only the routed experts
    return func(w.dequantize(), indices)


@implements([aten.index_select.default])
def _(func, types, args, kwargs):
    w, dim, index = args
    if dim % 3 == 0:
        return w.dequantize_experts(index)
    return func(w.dequantize(), dim, index)


@implements([aten.transpose.int])
def _(func, types, args, kwargs):
    w, d0, d1 = args[0], args[1] % 3, args[2] % 3
    if {d0, d1} == {1, 2}:
        return w._with(transposed=not w.transposed)
    if d0 == d1:
        return w
    raise NotImplementedError("MixedWidthExpertsTensor can only swap its last two dims; dequantize() first")


@implements([aten.slice.Tensor])
def _(func, types, args, kwargs):
    w, dim = args[0], args[1] if len(args) > 1 else 0
    start, end, step = (list(args[2:]) + [None, None, 1])[:3]
    if dim % 3 != 0:
        return func(w.dequantize(), dim, start, end, step)
    experts = list(range(w.num_experts))[slice(start, end, step)]
    if experts == list(range(w.num_experts)):
        return w
    return w._subset(experts)


@implements([aten.bmm.default, aten.matmul.default])
def _(func, types, args, kwargs):
    return func(_plain(args[0]), _plain(args[1]))


@implements([aten._grouped_mm.default])
def _(func, types, args, kwargs):
    args = [_plain(a) for a in args]
    return func(*args, **kwargs)


def _register_transformers_fallback() -> None:
    # transformers routes grouped_mm on CPU/compile to its own custom op; give it float weights
    try:
        import transformers.integrations.moe  # noqa: F401  (registers the op)

        op = torch.ops.transformers.grouped_mm_fallback.default
    except (ImportError, AttributeError, RuntimeError):
        return

    @implements([op])
    def _(func, types, args, kwargs):
        return func(*[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})


_register_transformers_fallback()
