"""The exportable form of a mixed-width expert stack: width groups of packed bytes, unpacked in the graph.

A fused expert weight ``[E, N, K]`` whose experts have different widths is stored as in
docs/architecture.md: per width b, ``packed_b`` uint8 ``[E_b, N, K*b/8]``, ``scale_b``/``zero_b`` float16
``[E_b, N, K/g]``, plus ``expert_bits[E]`` and ``slot[E]``. At run time the routed experts of each width group
are gathered *as bytes* and unpacked with integer ``div``/``remainder`` (bit shifts are not Core ATen and have
no ONNX translation), so the artifact keeps b bits per weight, 3-bit included.

The gather + unpack + dequantize is one op, ``moe_export::gather_dequant``, whose only kernel is
CompositeImplicitAutograd: ExecuTorch sees plain aten ops after decomposition, while the ONNX exporter can
keep the op and translate it to ``com.microsoft::GatherBlockQuantized`` where onnxruntime has a kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moe_export.quant.base import QuantizedWeight, symmetric_zero
from moe_export.quant.packing import pack

_LIB = torch.library.Library("moe_export", "FRAGMENT")  # other modules define ops in this namespace too
_LIB.define("gather_dequant(Tensor packed, Tensor scale, Tensor? zero, Tensor index, Tensor lut, int bits, int k) -> Tensor")
# Same, with integer zero points stored as packed b-bit codes (uint8 [E, N, ceil(G*b/8)]): the layout of
# onnxruntime's GatherBlockQuantized, which the ONNX exporter maps this op to.
_LIB.define("gather_dequant_codes(Tensor packed, Tensor scale, Tensor? zero_codes, Tensor index, Tensor lut, int bits, int k) -> Tensor")


def unpack_lut(bits: int) -> torch.Tensor:
    """Integer constants of the unpack for width b: divisors ``2**(b*i)`` of one word, then (when 8
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


def _dequant_rows(p, s, z, lut, bits: int, k: int):
    """Gathered rows: uint8 ``p`` [S, N, K*b/8], f16 ``s`` [S, N, G], ``z`` float [S, N, G] or None -> [S, N, K]."""
    n_groups = s.shape[-1]
    q = unpack_codes(p, lut, bits, k).float().reshape(p.shape[0], p.shape[1], n_groups, k // n_groups)  # [S, N, G, g]
    zero = symmetric_zero(bits) if z is None else z.float().unsqueeze(-1)
    return ((q - zero) * s.float().unsqueeze(-1)).reshape(p.shape[0], p.shape[1], k)


@torch.library.impl(_LIB, "gather_dequant", "CompositeImplicitAutograd")
def _gather_dequant(packed, scale, zero, index, lut, bits: int, k: int):
    # Gather bytes first: the float weight exists only for the routed rows, and no cast of a whole
    # constant table is left for an exporter to fold into a float initializer.
    z = None if zero is None else zero.index_select(0, index)
    return _dequant_rows(packed.index_select(0, index), scale.index_select(0, index), z, lut, bits, k)


@torch.library.impl(_LIB, "gather_dequant_codes", "CompositeImplicitAutograd")
def _gather_dequant_codes(packed, scale, zero_codes, index, lut, bits: int, k: int):
    z = None
    if zero_codes is not None:
        zc = zero_codes.index_select(0, index)  # [S, N, ceil(G*b/8)]
        z = unpack_codes(zc, lut, bits, zc.shape[-1] * 8 // bits)[..., : scale.shape[-1]]  # [S, N, G]
    return _dequant_rows(packed.index_select(0, index), scale.index_select(0, index), z, lut, bits, k)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., G]`` (any G) -> ``[..., ceil(G*b/8)]`` bytes, LSB-first, zero padded."""
    g = codes.shape[-1]
    padded = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], (-g) % 8)], dim=-1)
    return pack(padded, bits)[..., : (g * bits + 7) // 8].contiguous()


@dataclass
class WidthGroups:
    """The width-group layout of one fused expert weight ``[E, N, K]`` (docs/architecture.md)."""

    packed: dict[int, torch.Tensor]  # b -> uint8 [E_b, N, K*b/8]
    scale: dict[int, torch.Tensor]  # b -> f16 [E_b, N, K/g]
    zero: dict[int, torch.Tensor | None]  # b -> f16 [E_b, N, K/g] or None (symmetric)
    expert_bits: list[int]  # [E]
    slot: list[int]  # [E]
    n: int
    k: int

    @classmethod
    def from_quantized(cls, weights: list[QuantizedWeight]) -> "WidthGroups":
        """One :class:`QuantizedWeight` per expert, in expert order."""
        n, k = weights[0].shape
        bits = [w.bits for w in weights]
        packed, scale, zero, slot = {}, {}, {}, []
        for b in sorted(set(bits)):
            members = [w for w in weights if w.bits == b]
            packed[b] = torch.stack([pack(w.qdata, b) for w in members])
            scale[b] = torch.stack([w.scale for w in members])
            sym = [w.symmetric for w in members]
            if any(sym) and not all(sym):
                raise ValueError(f"{b}-bit experts of one weight mix symmetric and asymmetric grids; quantize them alike")
            zero[b] = None if sym[0] else torch.stack([w.zero for w in members])
        seen: dict[int, int] = {}
        for b in bits:
            slot.append(seen.get(b, 0))
            seen[b] = slot[-1] + 1
        return cls(packed, scale, zero, bits, slot, n, k)

    @classmethod
    def from_packed(cls, t) -> "WidthGroups":
        """The width groups a ``MixedWidthExpertsTensor`` (3-D) or ``PackedLinearWeight`` (2-D, one expert)
        already holds, taken as they are: no unpack and repack of the bytes."""
        if t.dim() == 2:
            b = t.bits
            zero = None if t.zero is None else t.zero.unsqueeze(0)
            return cls({b: t.packed.unsqueeze(0)}, {b: t.scale.unsqueeze(0)}, {b: zero}, [b], [0],
                       t.packed.shape[0], t.packed.shape[1] * 8 // b)
        packed, scale, zero = {}, {}, {}
        for b, p, s, z in t.groups():
            packed[b], scale[b], zero[b] = p, s, z
        return cls(packed, scale, zero, list(t.bit_widths), list(t.slots), t.out_features, t.in_features)

    def nbytes(self) -> int:
        total = 0
        for b in self.packed:
            total += self.packed[b].numel() + 2 * self.scale[b].numel()
            if self.zero[b] is not None:
                total += 2 * self.zero[b].numel()
        return total

    def dequantize(self) -> torch.Tensor:  # [E, N, K] float32, the reference every runtime must match
        out = []
        for e, b in enumerate(self.expert_bits):
            i = torch.tensor([self.slot[e]])
            z = None if self.zero[b] is None else self.zero[b]
            out.append(_gather_dequant(self.packed[b], self.scale[b], z, i, unpack_lut(b), b, self.k)[0])
        return torch.stack(out)


class MixedWidthWeight(nn.Module):
    """Buffers of one :class:`WidthGroups`; ``gather(index)`` returns the float rows ``[S, N, K]``."""

    def __init__(self, groups: WidthGroups):
        super().__init__()
        self.widths = sorted(groups.packed)
        self.n, self.k = groups.n, groups.k
        self.num_experts = len(groups.expert_bits)
        self.expert_bits = list(groups.expert_bits)
        self.coded: set[int] = set()  # widths whose zero_b holds packed integer codes (see use_zero_codes)
        for b in self.widths:
            self.register_buffer(f"packed_{b}", groups.packed[b].contiguous())
            self.register_buffer(f"scale_{b}", groups.scale[b].contiguous())
            self.register_buffer(f"zero_{b}", None if groups.zero[b] is None else groups.zero[b].contiguous())
            self.register_buffer(f"lut_{b}", unpack_lut(b), persistent=False)
        # Per width, the slot to gather for every expert id; experts of other widths point at slot 0 and
        # are masked out after the gather (static shapes: one gather per width, whatever the routing).
        group_of = torch.tensor([self.widths.index(b) for b in groups.expert_bits], dtype=torch.int64)
        self.register_buffer("group_of", group_of, persistent=False)  # [E]
        self.register_buffer("slot", torch.tensor(groups.slot, dtype=torch.int64), persistent=False)  # [E]

    def width_groups(self) -> WidthGroups:
        if self.coded:
            raise ValueError("width_groups() needs the float16 zeros; call it before use_zero_codes()")
        return WidthGroups(
            {b: getattr(self, f"packed_{b}") for b in self.widths},
            {b: getattr(self, f"scale_{b}") for b in self.widths},
            {b: getattr(self, f"zero_{b}") for b in self.widths},
            self.expert_bits, self.slot.tolist(), self.n, self.k,
        )

    def use_zero_codes(self) -> list[int]:
        """Store integer zero points as packed b-bit codes where onnxruntime's GatherBlockQuantized can read
        the group (b in 2/4/8, group size a power of two >= 16, zeros integral); returns those widths."""
        done = []
        for b in self.widths:
            if b not in (2, 4, 8) or b in self.coded:
                continue
            scale, zero = getattr(self, f"scale_{b}"), getattr(self, f"zero_{b}")
            g = self.k // scale.shape[-1]
            if g < 16 or g & (g - 1):
                continue
            if zero is not None:
                zf = zero.float()
                if not torch.equal(zf, zf.round()) or zf.min() < 0 or zf.max() > (1 << b) - 1:
                    continue  # fractional zeros (HQQ) keep the float16 form
                setattr(self, f"zero_{b}", pack_codes(zf.to(torch.uint8), b))
            self.coded.add(b)
            done.append(b)
        return done

    def _gather_width(self, b: int, slot: torch.Tensor) -> torch.Tensor:  # [S] slots -> [S, N, K]
        args = (getattr(self, f"packed_{b}"), getattr(self, f"scale_{b}"), getattr(self, f"zero_{b}"), slot,
                getattr(self, f"lut_{b}"), b, self.k)
        if b in self.coded:
            return torch.ops.moe_export.gather_dequant_codes(*args)
        return torch.ops.moe_export.gather_dequant(*args)

    def gather(self, index: torch.Tensor) -> torch.Tensor:  # index [S] expert ids -> [S, N, K]
        slot = self.slot.index_select(0, index)  # [S]
        if len(self.widths) == 1:
            return self._gather_width(self.widths[0], slot)
        group = self.group_of.index_select(0, index)  # [S]
        out = None
        for gi, b in enumerate(self.widths):
            mine = group == gi  # [S]
            w = self._gather_width(b, torch.where(mine, slot, torch.zeros_like(slot)))  # [S, N, K]
            out = w if out is None else torch.where(mine[:, None, None], w, out)
        return out


class PackedMixedExperts(nn.Module):
    """Drop-in for the HF experts module (Mixtral/Qwen3-MoE/OLMoE layout: fused gate_up ``[E, 2I, H]``,
    down ``[E, H, I]``), computing only the routed experts, each at its own width."""

    def __init__(self, gate_up: WidthGroups, down: WidthGroups, act_fn):
        super().__init__()
        self.gate_up_proj = MixedWidthWeight(gate_up)
        self.down_proj = MixedWidthWeight(down)
        self.num_experts = self.gate_up_proj.num_experts
        self.act_fn = act_fn

    @property
    def expert_bits(self) -> list[int]:
        return self.gate_up_proj.expert_bits

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, k], [T, k]
        t, h = hidden_states.shape
        k = top_k_index.shape[-1]
        idx = top_k_index.reshape(-1)  # [S = T*k]
        x = hidden_states.unsqueeze(1).expand(t, k, h).reshape(-1, h, 1)  # [S, H, 1]
        gu = torch.bmm(self.gate_up_proj.gather(idx), x).squeeze(-1)  # [S, 2I]
        gate, up = gu.chunk(2, dim=-1)
        a = (self.act_fn(gate) * up).unsqueeze(-1)  # [S, I, 1]
        y = torch.bmm(self.down_proj.gather(idx), a).squeeze(-1)  # [S, H]
        y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
        return y.reshape(t, k, h).sum(1).to(hidden_states.dtype)  # [T, H]


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every sparse MoE block with a router ``gate`` and fused ``experts``."""
    out = []
    for name, mod in model.named_modules():
        ex = getattr(mod, "experts", None)
        if ex is not None and hasattr(mod, "gate") and (isinstance(ex, PackedMixedExperts) or hasattr(ex, "gate_up_proj")):
            out.append((name, mod))
    return out


def quantize_experts_(
    model: nn.Module,
    bits: dict[str, list[int]] | list[int] | int,
    group_size: int | None = 32,
    symmetric: bool = False,
    quantizer: str = "rtn",
) -> nn.Module:
    """Replace each MoE block's float experts by :class:`PackedMixedExperts` (in place).

    ``bits``: per layer name a list of per-expert widths, one list for every layer, or one width.
    This is the export path's own quantizer front end (RTN/HQQ through ``moe_export.quant``); models
    quantized by ``moe_export.api.quantize_`` are converted by :func:`prepare_for_export` instead.
    """
    from moe_export.quant.base import get_quantizer

    q = get_quantizer(quantizer)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("no MoE block with fused experts (gate_up_proj/down_proj) found in the model")
    for name, block in blocks:
        ex = block.experts
        e = ex.gate_up_proj.shape[0]
        if isinstance(bits, dict):
            if name not in bits:
                raise ValueError(f"no bit widths given for MoE layer {name!r}; layers are {[n for n, _ in blocks]}")
            layer_bits = bits[name]
        else:
            layer_bits = [bits] * e if isinstance(bits, int) else list(bits)
        if len(layer_bits) != e:
            raise ValueError(f"layer {name!r} has {e} experts but {len(layer_bits)} bit widths were given")
        stacks = []
        for p in (ex.gate_up_proj, ex.down_proj):
            w = p.detach().float()
            stacks.append(WidthGroups.from_quantized([q.quantize(w[i], b, group_size, symmetric) for i, b in enumerate(layer_bits)]))
        block.experts = PackedMixedExperts(stacks[0], stacks[1], ex.act_fn)
    return model


def dequantized_reference(float_model: nn.Module, packed_model: nn.Module) -> nn.Module:
    """A copy of ``float_model`` whose experts hold the weights of ``packed_model`` dequantized, run by
    HF's own expert code: an independent eager reference for the packed experts."""
    import copy

    ref = copy.deepcopy(float_model)
    packed = dict(moe_blocks(packed_model))
    for name, block in moe_blocks(ref):
        src = packed[name].experts
        if not isinstance(src, PackedMixedExperts):
            raise ValueError(f"{name}: the packed model's experts are {type(src).__name__}, not PackedMixedExperts")
        with torch.no_grad():
            block.experts.gate_up_proj.copy_(src.gate_up_proj.width_groups().dequantize())
            block.experts.down_proj.copy_(src.down_proj.width_groups().dequantize())
    return ref
