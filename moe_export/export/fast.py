"""Speed-oriented export forms of a mixed-width expert stack: dense dispatch over experts with each expert's
projections on the runtime's fast quantized kernel.

Packed non-expert linears (attention, lm_head at the plan's non-expert widths) get the same kernel as the
experts in both modes.

* ONNX ``fast``: every expert projection is one ``com.microsoft::MatMulNBits`` (2/4/8-bit codes, block =
  group size). int3 has no MatMulNBits kernel: 3-bit codes go in 4-bit containers (same values, 4 bits a
  weight), 1-bit in 2-bit containers, 5-7 bits in 8-bit ones (``qmoe.CONTAINER``); fractional (HQQ) zeros become
  float zero points.
* ExecuTorch ``xnnpack-int``: experts whose codes fit symmetric int4 exactly (``q - zero`` in [-7, 7]: every
  1-3 bit expert with integer zeros, 4-bit experts that happen to) become torchao
  ``IntxUnpackedToInt8Tensor`` linears with int8 dynamic activations, which XNNPACK runs group-wise;
  the others keep the packed bytes and the portable in-graph unpack.

Dense dispatch: at decode T=1 and top-k of E experts, running all E experts on the fast kernels costs less than
the gather + unpack of k experts on portable kernels; routing becomes a ``[T, E]`` weight matrix, zero for
unrouted experts, so the result equals the sparse one. In ONNX each expert also sits under an ``If`` on "any
token routed here" (``torch.cond``), so decode runs only the routed experts.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from moe_export.export.experts import MixedWidthWeight, PackedMixedExperts
from moe_export.export.ops import define_ops
from moe_export.export.qmoe import CONTAINER
from moe_export.runtime.layout import dequantize_rows, pack, pack_codes, symmetric_zero, unpack_codes, unpack_lut


class NBitsLinear(nn.Module):
    """One expert projection in MatMulNBits layout: ``B`` uint8 ``[N, K/g, g*c/8]`` (c = container width)."""

    def __init__(self, packed, scale, zero, bits: int, k: int, accuracy_level: int):
        super().__init__()
        define_ops()  # forward calls moe_export::matmul_nbits
        c = CONTAINER[bits]  # the codes as stored; the zero point says where the width's zero sits
        n, g_count = scale.shape
        g = k // g_count
        codes = unpack_codes(packed, unpack_lut(bits), bits, k).to(torch.uint8)  # [N, K]
        sym_zero = symmetric_zero(bits)
        if zero is None and (c == bits and sym_zero == 1 << (c - 1)):
            zq = None  # MatMulNBits' default zero point 2**(c-1) is ours
        else:
            zf = torch.full_like(scale, sym_zero, dtype=torch.float32) if zero is None else zero.float()
            if torch.equal(zf, zf.round()) and zf.min() >= 0 and zf.max() < (1 << c):
                zq = pack_codes(zf.to(torch.uint8), c)  # [N, ceil(G*c/8)]
            else:
                zq = zf.to(scale.dtype)  # fractional (HQQ) zeros: float zero points
        self.register_buffer("packed", pack(codes, c).reshape(n, g_count, g * c // 8).contiguous())
        self.register_buffer("scale", scale.contiguous())
        self.register_buffer("zero", zq)
        self.register_buffer("lut", unpack_lut(c), persistent=False)
        self.bits, self.stored_bits, self.k, self.n, self.accuracy_level = c, bits, k, n, accuracy_level

    def forward(self, x):  # [T, K] -> [T, N]
        return torch.ops.moe_export.matmul_nbits(x, self.packed, self.scale, self.zero, self.lut, self.bits, self.k,
                                                 self.accuracy_level)


def _expert_qparams(w: MixedWidthWeight, e: int):
    """(packed [N, K*b/8], scale [N, G], zero [N, G] or None, bits) of expert ``e``."""
    if w.coded:
        raise ValueError("expert weights were converted to packed zero codes; build the fast form from a fresh copy")
    return w.width_groups().expert(e)


class DenseExperts(nn.Module):
    """Every expert on every token, weighted by the dense routing matrix; ``gate[e]``/``up[e]``/``down[e]`` are
    any ``[T, K] -> [T, N]`` modules. ``up=None``: ``gate[e]`` is the fused gate_up projection (one kernel call
    fewer: ONNX); split gate/up leave no slicing between kernels, so an XNNPACK delegate takes the expert
    stack in one piece."""

    def __init__(self, gate: list[nn.Module], up: list[nn.Module] | None, down: list[nn.Module], act_fn,
                 expert_bits: list[int]):
        super().__init__()
        self.gate, self.down = nn.ModuleList(gate), nn.ModuleList(down)
        self.up = None if up is None else nn.ModuleList(up)
        self.act_fn = act_fn
        self.num_experts = len(gate)
        self.expert_bits = list(expert_bits)
        self.skip_unrouted = False
        # out + w * expert_e(x) under an If: the weighted sum is built inside the branches, so an unrouted expert
        # costs one If and a copy, and no zeros, stack or routing matmul follow the experts
        self._accumulate_fns = [lambda out, x, w, e=e: out + w * self._expert(e, x) for e in range(self.num_experts)]

    def _expert(self, e: int, x):  # [T, H] -> [T, H]
        if self.up is None:
            gate, up = self.gate[e](x).chunk(2, dim=-1)  # [T, I] each
        else:
            gate, up = self.gate[e](x), self.up[e](x)
        return self.down[e](self.act_fn(gate) * up)

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, k], [T, k]
        x = hidden_states
        experts = torch.arange(self.num_experts, dtype=top_k_index.dtype)  # [E]
        route = ((top_k_index.unsqueeze(-1) == experts).to(x.dtype) * top_k_weights.unsqueeze(-1).to(x.dtype)).sum(1)  # [T, E]
        if self.skip_unrouted:  # an ONNX If per expert: at decode only the k routed experts run
            hit = (route != 0).any(0)  # [E]
            out = torch.zeros_like(x)  # [T, H]
            for e in range(self.num_experts):
                out = torch.cond(hit[e], self._accumulate_fns[e], _pass_through, (out, x, route[:, e : e + 1]))
            return out
        y = torch.stack([self._expert(e, x) for e in range(self.num_experts)], dim=1)  # [T, E, H]
        return torch.bmm(route.unsqueeze(1), y).squeeze(1)  # [T, H]


def _pass_through(out, x, w):
    return out.clone()  # a cond branch may not return its input itself


def _split_experts(ex: PackedMixedExperts, make, fused: bool = False) -> "DenseExperts":
    """``make(packed, scale, zero, bits, k)`` per expert projection; gate_up rows split into gate and up
    unless ``fused``."""
    gate, up, down = [], [], []
    half = ex.gate_up_proj.n // 2
    for e in range(ex.num_experts):
        p, s, z, b = _expert_qparams(ex.gate_up_proj, e)
        k = ex.gate_up_proj.k
        if fused:
            gate.append(make(p, s, z, b, k))
        else:
            gate.append(make(p[:half], s[:half], None if z is None else z[:half], b, k))
            up.append(make(p[half:], s[half:], None if z is None else z[half:], b, k))
        p, s, z, b = _expert_qparams(ex.down_proj, e)
        down.append(make(p, s, z, b, ex.down_proj.k))
    return DenseExperts(gate, None if fused else up, down, ex.act_fn, ex.expert_bits)


class _Biased(nn.Module):
    def __init__(self, inner: nn.Module, bias: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return self.inner(x) + self.bias


def _replace_experts(model: nn.Module, build, make_linear=None) -> nn.Module:
    """A copy with every packed expert stack replaced by ``build(experts)`` and, given ``make_linear``, every packed
    non-expert linear (:func:`replace_packed_linears`)."""
    model = copy.deepcopy(model)
    n = 0
    for mod in list(model.modules()):
        ex = getattr(mod, "experts", None)
        if isinstance(ex, PackedMixedExperts):
            mod.experts = build(ex)
            n += 1
    if n == 0:
        raise ValueError("no packed mixed-width experts in the model: fast export modes need a quantized model "
                         "(prepare_for_export of a moe_export.api.quantize_ model)")
    if make_linear is not None:
        replace_packed_linears(model, make_linear)
    return model


def replace_packed_linears(model: nn.Module, make_linear) -> dict[int, int]:
    """Every packed non-expert linear (quantized attention, lm_head, ...) of ``model`` replaced in place by
    ``make_linear(packed, scale, zero, bits, k)``: left as in-graph unpacks, those would dequantize their whole
    weight on every step. Returns how many linears of each stored width were replaced."""
    from moe_export.export.prepare import PackedLinear

    counts: dict[int, int] = {}
    for name, mod in list(model.named_modules()):
        if isinstance(mod, PackedLinear):
            p, sc, z, b = _expert_qparams(mod.weight_q, 0)
            new = make_linear(p, sc, z, b, mod.weight_q.k)
            if mod.bias is not None:
                new = _Biased(new, mod.bias)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
            counts[b] = counts.get(b, 0) + 1
    return counts


def nbits_linear(p, s, z, b: int, k: int, accuracy_level: int) -> nn.Module:
    """One packed projection on MatMulNBits (any width 1-8, in its container); 8-bit codes with fractional (HQQ)
    zeros, which onnxruntime's MatMulNBits rejects, as an exact float linear."""
    if CONTAINER[b] == 8 and z is not None and not torch.equal(z.float(), z.float().round()):
        return _float_linear(p, s, z, b, k)
    return NBitsLinear(p, s, z, b, k, accuracy_level)


def to_nbits_experts(model: nn.Module, accuracy_level: int = 4, skip_unrouted: bool = True) -> nn.Module:
    """A copy of a prepared model (or DecoderStep) whose experts run as MatMulNBits projections.

    ``skip_unrouted``: each expert under ``torch.cond`` (an ONNX ``If``) on "any token routed here", so decode
    runs only the k routed experts (measured 0.43 vs 0.92 ms a token, 16 experts, one layer; same logits)."""

    def make(p, s, z, b, k):
        return nbits_linear(p, s, z, b, k, accuracy_level)

    def build(ex: PackedMixedExperts) -> DenseExperts:
        dense = _split_experts(ex, make, fused=True)
        dense.skip_unrouted = skip_unrouted
        return dense

    return _replace_experts(model, build, make)


# ---------------------------------------------------------------- ExecuTorch: XNNPACK int4 group-wise experts


class PackedExpertLinear(nn.Module):
    """One expert that XNNPACK cannot run exactly: its packed bytes, unpacked in the graph (portable kernels)."""

    def __init__(self, packed, scale, zero, bits: int, k: int):
        super().__init__()
        define_ops()  # forward calls moe_export::gather_dequant
        self.register_buffer("packed", packed.unsqueeze(0).contiguous())
        self.register_buffer("scale", scale.unsqueeze(0).contiguous())
        self.register_buffer("zero", None if zero is None else zero.unsqueeze(0).contiguous())
        self.register_buffer("lut", unpack_lut(bits), persistent=False)
        self.register_buffer("index", torch.zeros(1, dtype=torch.long), persistent=False)
        self.bits, self.k = bits, k

    def forward(self, x):
        w = torch.ops.moe_export.gather_dequant(self.packed, self.scale, self.zero, self.index, self.lut, self.bits,
                                                self.k)  # [1, N, K]
        # bmm with a computed weight is delegated to XNNPACK; linear/mm with a non-constant weight is not
        return torch.bmm(w, x.t().unsqueeze(0))[0].t()  # [T, N]


def int4_codes(packed, scale, zero, bits: int, k: int) -> torch.Tensor | None:
    """``q - zero`` as int8 ``[N, K]`` when it lies in [-7, 7] (exact symmetric int4), else None."""
    if bits > 4:
        return None
    n, g_count = scale.shape
    q = unpack_codes(packed, unpack_lut(bits), bits, k).reshape(n, g_count, k // g_count).float()
    z = torch.tensor(symmetric_zero(bits)) if zero is None else zero.float().unsqueeze(-1)
    d = q - z
    if not torch.equal(d, d.round()) or d.abs().max() > 7:
        return None
    return d.reshape(n, k).to(torch.int8)


def int4_linear(packed, scale, zero, bits: int, k: int) -> nn.Linear | None:
    """A bias-free ``nn.Linear`` whose weight is torchao's ``IntxUnpackedToInt8Tensor`` (int4 group-wise,
    symmetric, int8 dynamic per-token activations), with codes equal to ``q - zero`` bit for bit; None when
    the expert does not fit."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor, IntxUnpackedToInt8TensorActivationQuantization,
    )

    codes = int4_codes(packed, scale, zero, bits, k)
    if codes is None:
        return None
    n, g_count = scale.shape
    g = k // g_count
    s = scale.float()  # [N, G]
    w_hp = (codes.float().reshape(n, g_count, g) * s.unsqueeze(-1)).reshape(n, k)  # the eager dequantized weight
    qt = IntxUnpackedToInt8Tensor.from_hp(
        w_hp, (1, g), torch.int4, mapping_type=None, intx_choose_qparams_algorithm=None, custom_scale=s,
        custom_zero_point=torch.zeros_like(s, dtype=torch.int8),
        activation_quantization=IntxUnpackedToInt8TensorActivationQuantization.INT8_ASYM_PER_TOKEN,
    )
    if not torch.equal(qt.qdata, codes):
        raise AssertionError("torchao int4 codes differ from the stored q - zero; refusing an inexact lowering")
    lin = nn.Linear(k, n, bias=False)
    lin.weight = nn.Parameter(qt, requires_grad=False)
    return lin


def _float_linear(p, s, z, b: int, k: int) -> nn.Linear:
    """The dequantized expert as a plain float linear: exact, 4 bytes a weight (fallback of the speed modes)."""
    w = dequantize_rows(p, s, z, unpack_lut(b), b, k)  # [N, K]
    lin = nn.Linear(k, w.shape[0], bias=False)
    lin.weight = nn.Parameter(w, requires_grad=False)
    return lin


XNNPACK_INT_FALLBACKS = ("float", "packed")


def to_xnnpack_int_experts(model: nn.Module, fallback: str = "float") -> tuple[nn.Module, dict[str, int]]:
    """A copy whose int4-exact experts are torchao int4 linears (for XNNPACK); returns it and the number of
    projections per kind. The others (8-bit, 4-bit codes beyond [-7, 7]) get ``fallback``: ``float`` = the
    dequantized weight as a float linear (XNNPACK fp32, exact, 4 bytes a weight) or ``packed`` = packed bytes
    and the portable unpack (b bits a weight; measured 16 ms vs 0.3 ms float on the tiny zoo model: portable
    kernels and a delegate split at every such expert)."""
    if fallback not in XNNPACK_INT_FALLBACKS:
        raise ValueError(f"unknown fallback {fallback!r}; choose one of {', '.join(XNNPACK_INT_FALLBACKS)}")
    counts = {"int4": 0, fallback: 0}

    def make(p, s, z, b, k):
        lin = int4_linear(p, s, z, b, k)
        if lin is not None:
            counts["int4"] += 1
            return lin
        counts[fallback] += 1
        if fallback == "packed":
            return PackedExpertLinear(p, s, z, b, k)
        return _float_linear(p, s, z, b, k)

    def build(ex: PackedMixedExperts) -> DenseExperts:
        return _split_experts(ex, make)

    return _replace_experts(model, build, make), counts
