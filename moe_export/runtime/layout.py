"""The mixed-width expert layout: how per-expert codes of different widths are stored, and how they are read back.

Bit stream. Unsigned b-bit codes (1 <= b <= 8) are packed along the last dim, LSB first: value j of a row
occupies bits ``[j*b, (j+1)*b)`` of the row's byte string. Every 8 values fill exactly b bytes, so 3-bit
weights cost 3 bits, not 4. For b in {1, 2, 4} this is the usual "element 0 in the low bits" layout of ONNX
INT4/INT2 and onnxruntime's MatMulNBits.

Grid. One group of ``g`` consecutive input columns of a row shares a float16 ``scale`` and ``zero``::

    w_hat = (q - zero) * scale

Asymmetric grids store ``zero``; symmetric grids use the constant :func:`symmetric_zero` and store none.
:func:`dequantize` is that formula, the one every runtime must reproduce bit for bit.

Width groups. A fused expert weight ``[E, N, K]`` whose experts have different widths is :class:`WidthGroups`:
for every width b present, ``packed[b]`` uint8 ``[E_b, N, K*b/8]``, ``scale[b]`` float16 ``[E_b, N, K/g]`` and
``zero[b]`` (same shape, or None when symmetric); expert e is row ``slots[e]`` of the group of width
``bit_widths[e]`` (:func:`slot_numbering`). The tensor subclasses (``runtime.tensors``), the export modules
(``export.experts``, ``export.fast``) and the checkpoint all hold this one layout.

Three ways to unpack, each where it is needed, all equal to :func:`unpack`:

* :func:`unpack`: the reference (int64 words; also what :func:`pack` inverts);
* :func:`unpack_bits` / :func:`position_codes`: uint8 shifts and masks of whole byte planes, pointwise only,
  so inductor fuses the unpack into its consumer (eager and ``torch.compile``);
* :func:`unpack_codes`: integer ``div``/``remainder`` (bit shifts are not Core ATen and have no ONNX
  translation), for exported graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def symmetric_zero(bits: int) -> float:
    # 1-bit symmetric is sign binarisation (levels +-scale/2); wider grids are signed ints offset by 2**(b-1).
    return 0.5 if bits == 1 else float(2 ** (bits - 1))


def check_packable(k: int, bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    if k % 8:
        raise ValueError(f"the packed dim must be a multiple of 8, got {k}")


# ------------------------------------------------------------------------------------------ the bit stream


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q``: uint8 ``[..., K]`` with values in ``[0, 2**bits)`` -> uint8 ``[..., K * bits // 8]``."""
    k = q.shape[-1]
    check_packable(k, bits)
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
    """The reference unpack, inverse of :func:`pack`: uint8 ``[..., K * bits // 8]`` -> uint8 ``[..., K]``."""
    check_packable(k, bits)
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


def unit_shape(bits: int) -> tuple[int, int]:
    """``(values, bytes)`` of one packed unit: a byte for 1/2/4/8 bits, 8 values in b bytes otherwise."""
    return (8 // bits, 1) if bits in (1, 2, 4, 8) else (8, bits)


def position_codes(planes: torch.Tensor, p: int, bits: int) -> torch.Tensor:
    """Value ``p`` of every packed unit: ``planes`` ``[..., unit_bytes]`` (uint8 or int32) -> ``[...]``.

    A shift and mask of whole byte planes (a value spans at most two bytes), so every load is contiguous
    or a fixed stride and inductor vectorizes it; with uint8 planes the wrap drops bits above the value."""
    lo, sh = divmod(p * bits, 8)
    v = planes[..., lo]
    if bits == 8:
        return v
    v = v >> sh
    if sh + bits > 8:  # straddles into the next byte
        v = v | (planes[..., lo + 1] << (8 - sh))
    return v & ((1 << bits) - 1)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Same result as :func:`unpack`, in uint8 arithmetic with pointwise ops only (no reduction, no widening),
    so eager moves a quarter of the bytes and inductor fuses the unpack into its consumer.
    ``uint8 [..., K*b/8] -> uint8 [..., K]``."""
    check_packable(k, bits)
    if bits == 8:
        return packed
    lead = packed.shape[:-1]
    if bits in (1, 2, 4):
        per_byte = 8 // bits  # values never straddle a byte
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        return ((packed.reshape(*lead, k // per_byte, 1) >> shifts) & ((1 << bits) - 1)).reshape(*lead, k)
    planes = packed.reshape(*lead, k // 8, bits)  # [..., K/8, b]
    return torch.stack([position_codes(planes, p, bits) for p in range(8)], -1).reshape(*lead, k)


def unpack_lut(bits: int) -> torch.Tensor:
    """Integer constants of :func:`unpack_codes` for width b: divisors ``2**(b*i)`` of one word, then (when 8
    values span b bytes) the byte weights ``256**j`` that rebuild that word. Passed to the op as a tensor:
    one broadcast ``div``/``remainder`` instead of one op per code keeps the exported graph small."""
    per = 8 // bits if 8 % bits == 0 else 8
    vals = [1 << (bits * i) for i in range(per)]
    if 8 % bits:
        vals += [1 << (8 * j) for j in range(bits)]
    return torch.tensor(vals, dtype=torch.int64)


def unpack_codes(p: torch.Tensor, lut: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """uint8 ``[..., K*b/8]`` LSB-first bit stream -> int64 codes ``[..., K]`` (``lut = unpack_lut(bits)``),
    with integer div/remainder only: bit shifts are not Core ATen and have no ONNX translation."""
    lead = p.shape[:-1]
    if bits == 8:
        return p.long()
    if 8 % bits == 0:
        word = p.long().unsqueeze(-1)  # [..., B, 1]
        div = lut
    else:  # 8 values span b bytes: rebuild the 8b-bit word, then cut it into 8 codes
        chunks = p.reshape(*lead, k // 8, bits).long()  # [..., K/8, b]
        word = (chunks * lut[8:]).sum(-1, keepdim=True)  # [..., K/8, 1]
        div = lut[:8]
    codes = torch.remainder(torch.div(word, div, rounding_mode="floor"), 1 << bits)  # [..., B, per]
    return codes.reshape(*lead, k)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., G]`` (any G) -> ``[..., ceil(G*b/8)]`` bytes, LSB-first, zero padded."""
    g = codes.shape[-1]
    padded = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], (-g) % 8)], dim=-1)
    return pack(padded, bits)[..., : (g * bits + 7) // 8].contiguous()


# ------------------------------------------------------------------------------------------ the grid


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, dtype=torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` group-wise: codes ``q`` ``[..., N, K]`` (any int dtype), ``scale`` ``[..., N, G]``,
    ``zero`` the same or one float (a symmetric grid's constant) -> ``[..., N, K]`` in ``dtype``."""
    k, n_groups = q.shape[-1], scale.shape[-1]
    qg = q.to(dtype).reshape(*q.shape[:-1], n_groups, k // n_groups)  # [..., N, G, g]
    z = zero if isinstance(zero, float) else zero.to(dtype).unsqueeze(-1)
    w = (qg - z) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(q.shape)


def zero_or_constant(zero: torch.Tensor | None, bits: int) -> torch.Tensor | float:
    """The zero points, or a symmetric grid's one constant (a float: no table is built)."""
    return symmetric_zero(bits) if zero is None else zero


def zero_table(zero: torch.Tensor | None, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The zero points as a table shaped like ``scale`` (a symmetric grid's constant filled in), for quantizers'
    tensor arithmetic."""
    return torch.full_like(scale, symmetric_zero(bits)) if zero is None else zero


def dequantize_packed(
    packed: torch.Tensor,  # uint8 [..., N, K*b/8]
    scale: torch.Tensor,  # f16 [..., N, G]
    zero: torch.Tensor | None,  # f16 [..., N, G] or None (symmetric)
    bits: int,
    k: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [..., N, K]
    """Packed bytes -> float weights with the pointwise unpack (eager and ``torch.compile``)."""
    return dequantize(unpack_bits(packed, bits, k), scale, zero_or_constant(zero, bits), dtype)


def lookup_rows(ids: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``ids`` (any shape) of one packed 2-D weight ``[N, K*b/8]`` as float ``[*ids.shape, K]``: the packed
    rows are gathered first and only those are unpacked (an embedding lookup)."""
    flat = ids.reshape(-1)
    z = None if zero is None else zero[flat]
    return dequantize_packed(packed[flat], scale[flat], z, bits, k, dtype).reshape(*ids.shape, k)


def dequantize_rows(p, s, z, lut, bits: int, k: int) -> torch.Tensor:
    """Exportable: uint8 ``p`` [..., N, K*b/8], f16 ``s`` [..., N, G], ``z`` [..., N, G] or None -> float32
    [..., N, K], with the div/remainder unpack."""
    return dequantize(unpack_codes(p, lut, bits, k), s, zero_or_constant(z, bits), torch.float32)


# ------------------------------------------------------------------------------------------ width groups


def slot_numbering(bit_widths) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(slots, widths)``: expert e's row inside its width group (experts of one width keep their order), and
    the widths present, ascending."""
    counts: dict[int, int] = {}
    slots = []
    for b in bit_widths:
        slots.append(counts.get(b, 0))
        counts[b] = slots[-1] + 1
    return tuple(slots), tuple(sorted(counts))


@dataclass(eq=False)  # hashable by identity: torch.compile traces code that builds one
class WidthGroups:
    """The width-group layout of one fused expert weight ``[E, N, K]`` (a 2-D weight is one expert)."""

    packed: dict[int, torch.Tensor]  # b -> uint8 [E_b, N, K*b/8]
    scale: dict[int, torch.Tensor]  # b -> f16 [E_b, N, K/g]
    zero: dict[int, torch.Tensor | None]  # b -> f16 [E_b, N, K/g] or None (symmetric)
    bit_widths: tuple[int, ...]  # [E]
    group_size: int | None  # None = one group per row
    slots: tuple[int, ...] = field(init=False)  # [E]: expert e's row inside its width group
    widths: tuple[int, ...] = field(init=False)  # the widths present, ascending

    def __post_init__(self):
        self.bit_widths = tuple(int(b) for b in self.bit_widths)
        self.slots, self.widths = slot_numbering(self.bit_widths)
        if set(self.packed) != set(self.widths):
            raise ValueError(f"width groups {sorted(self.packed)} do not match the experts' widths {list(self.widths)}")

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qweights) -> "WidthGroups":
        """One ``QuantizedWeight`` ``[N, K]`` per expert, in expert order (codes packed here)."""
        if not qweights:
            raise ValueError("an expert stack needs at least one expert")
        shapes = {tuple(q.shape) for q in qweights}
        sym = {q.symmetric for q in qweights}
        gs = {q.group_size for q in qweights}
        if len(shapes) != 1 or len(sym) != 1 or len(gs) != 1:
            raise ValueError(
                f"all experts of one stack must share shape, group size and symmetry; got shapes {sorted(shapes)}, "
                f"group sizes {sorted(gs, key=str)}, symmetric {sorted(sym)}"
            )
        return cls.from_experts([(pack(q.qdata, q.bits), q.scale, q.zero, q.bits) for q in qweights],
                                qweights[0].group_size)

    @classmethod
    def from_experts(cls, experts, group_size: int | None) -> "WidthGroups":
        """``(packed [N, K*b/8], scale [N, G], zero [N, G] or None, bits)`` per expert, in expert order."""
        if not experts:
            raise ValueError("an expert stack needs at least one expert")
        bit_widths = [e[3] for e in experts]
        packed, scale, zero = {}, {}, {}
        for b in slot_numbering(bit_widths)[1]:
            members = [e for e in experts if e[3] == b]  # slot order
            packed[b] = torch.stack([m[0] for m in members])  # [E_b, N, K*b/8]
            scale[b] = torch.stack([m[1] for m in members])  # [E_b, N, G]
            zero[b] = None if members[0][2] is None else torch.stack([m[2] for m in members])
        return cls(packed, scale, zero, bit_widths, group_size)

    # -- what consumers read ----------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        return len(self.bit_widths)

    @property
    def n(self) -> int:
        return self.packed[self.widths[0]].shape[1]

    @property
    def k(self) -> int:
        b = self.widths[0]
        return self.packed[b].shape[2] * 8 // b

    @property
    def symmetric(self) -> bool:
        return self.zero[self.widths[0]] is None

    def groups(self):
        """``(bits, packed_b, scale_b, zero_b)`` for every width present, ascending."""
        for b in self.widths:
            yield b, self.packed[b], self.scale[b], self.zero[b]

    def expert(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
        """``(packed [N, K*b/8], scale [N, G], zero [N, G] or None, bits)`` of expert ``e`` (views, no copy)."""
        b, s = self.bit_widths[e], self.slots[e]
        z = self.zero[b]
        return self.packed[b][s], self.scale[b][s], None if z is None else z[s], b

    def nbytes(self) -> int:
        """Bytes of packed codes + scales + zeros (the expert -> (width, slot) tables are not counted)."""
        return sum(t.numel() * t.element_size() for _, *ts in self.groups() for t in ts if t is not None)

    def codes(self, e: int) -> torch.Tensor:
        """Expert ``e``'s unpacked codes, uint8 ``[N, K]``."""
        p, _, _, b = self.expert(e)
        return unpack(p, b, self.k)

    def dequantize_expert(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reference: expert ``e`` as float ``[N, K]``."""
        p, s, z, b = self.expert(e)
        return dequantize(unpack(p, b, self.k), s, zero_or_constant(z, b), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All experts as float ``[E, N, K]``, in expert order: one dequantize per width group, no loop over experts."""
        parts = [dequantize_packed(p, s, z, b, self.k, dtype) for b, p, s, z in self.groups()]  # [E_b, N, K] each
        cat = torch.cat(parts)  # [E, N, K] in (width, slot) order
        offsets, start = {}, 0
        for b, p, _, _ in self.groups():
            offsets[b] = start
            start += p.shape[0]
        order = [offsets[b] + s for b, s in zip(self.bit_widths, self.slots)]
        return cat[torch.tensor(order, device=cat.device)]
