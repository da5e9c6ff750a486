"""The exportable form of a mixed-width expert stack: width groups of packed bytes, unpacked in the graph.

A fused expert weight ``[E, N, K]`` whose experts have different widths is stored as in
docs/architecture.md: per width b, ``packed_b`` uint8 ``[E_b, N, K*b/8]``, ``scale_b``/``zero_b`` float16
``[E_b, N, K/g]``, plus ``expert_bits[E]`` and ``slot[E]``. At run time the routed experts of each width group
are gathered *as bytes* and unpacked with integer ``div``/``remainder`` (bit shifts are not Core ATen and have
no ONNX translation), so the artifact keeps b bits per weight, 3-bit included.

The gather + unpack + dequantize is one op, ``moe_export::gather_dequant`` (``export.ops``, defined when a
:class:`MixedWidthWeight` is built), whose only kernel is CompositeImplicitAutograd: ExecuTorch sees plain aten ops
after decomposition, while the ONNX exporter can keep the op and translate it to
``com.microsoft::GatherBlockQuantized`` where onnxruntime has a kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moe_export.export.ops import define_ops
from moe_export.runtime.layout import WidthGroups, pack_codes, unpack_lut


class MixedWidthWeight(nn.Module):
    """The buffers of one layout (``runtime.layout.WidthGroups``, as a tensor subclass holds it: ``width_groups()``);
    ``gather(index)`` returns the float rows ``[S, N, K]``."""

    def __init__(self, groups: WidthGroups):
        super().__init__()
        define_ops()  # forward calls moe_export::gather_dequant(_codes)
        self.widths = list(groups.widths)
        self.n, self.k = groups.n, groups.k
        self.num_experts = groups.num_experts
        self.expert_bits = list(groups.bit_widths)
        self.group_size = groups.group_size
        self.coded: set[int] = set()  # widths whose zero_b holds packed integer codes (see use_zero_codes)
        for b in self.widths:
            self.register_buffer(f"packed_{b}", groups.packed[b].contiguous())
            self.register_buffer(f"scale_{b}", groups.scale[b].contiguous())
            self.register_buffer(f"zero_{b}", None if groups.zero[b] is None else groups.zero[b].contiguous())
            self.register_buffer(f"lut_{b}", unpack_lut(b), persistent=False)
        # Per width, the slot to gather for every expert id; experts of other widths point at slot 0 and
        # are masked out after the gather (static shapes: one gather per width, whatever the routing).
        group_of = torch.tensor([self.widths.index(b) for b in groups.bit_widths], dtype=torch.int64)
        self.register_buffer("group_of", group_of, persistent=False)  # [E]
        self.register_buffer("slot", torch.tensor(groups.slots, dtype=torch.int64), persistent=False)  # [E]

    def width_groups(self) -> WidthGroups:
        """The width groups these buffers hold (the same tensors)."""
        if self.coded:
            raise ValueError("width_groups() needs the float16 zeros; call it before use_zero_codes()")
        return WidthGroups({b: getattr(self, f"packed_{b}") for b in self.widths},
                           {b: getattr(self, f"scale_{b}") for b in self.widths},
                           {b: getattr(self, f"zero_{b}") for b in self.widths}, self.expert_bits, self.group_size)


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
    down ``[E, H, I]``), computing only the routed experts, each at its own width.

    ``gated=False``: experts without a gate (SwitchTransformers: ``wo(act(wi x))``); ``gate_up_proj`` then holds
    ``wi`` ``[E, I, H]`` and ``down_proj`` ``wo`` ``[E, H, I]``. Either projection may also be a
    :class:`FloatExpertStack` (a float model's experts)."""

    def __init__(self, gate_up: WidthGroups, down: WidthGroups, act_fn, gated: bool = True):
        super().__init__()
        self.gate_up_proj = gate_up if isinstance(gate_up, FloatExpertStack) else MixedWidthWeight(gate_up)
        self.down_proj = down if isinstance(down, FloatExpertStack) else MixedWidthWeight(down)
        self.num_experts = self.gate_up_proj.num_experts
        self.act_fn = act_fn
        self.gated = gated

    @property
    def expert_bits(self) -> list[int]:
        return self.gate_up_proj.expert_bits

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, k], [T, k]
        t, h = hidden_states.shape
        k = top_k_index.shape[-1]
        idx = top_k_index.reshape(-1)  # [S = T*k]
        x = hidden_states.unsqueeze(1).expand(t, k, h).reshape(-1, h, 1)  # [S, H, 1]
        gu = torch.bmm(self.gate_up_proj.gather(idx), x).squeeze(-1)  # [S, 2I] ([S, I] ungated)
        if self.gated:
            gate, up = gu.chunk(2, dim=-1)
            a = (self.act_fn(gate) * up).unsqueeze(-1)  # [S, I, 1]
        else:
            a = self.act_fn(gu).unsqueeze(-1)  # [S, I, 1]
        y = torch.bmm(self.down_proj.gather(idx), a).squeeze(-1)  # [S, H]
        y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
        return y.reshape(t, k, h).sum(1).to(hidden_states.dtype)  # [T, H]


class FloatExpertStack(nn.Module):
    """Float expert weights ``[E, N, K]`` with :class:`MixedWidthWeight`'s ``gather``: a float model's experts in the
    same routed form (the float baseline artifact of a model with one module per expert)."""

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weights.detach().contiguous())  # [E, N, K]
        self.num_experts = weights.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:  # [S] -> [S, N, K]
        return self.weight.index_select(0, index)


class PackedTop1MLP(nn.Module):
    """Drop-in for SwitchTransformers' sparse MLP (router + one module per expert): the float router picks one
    expert per token (softmax, argmax) and scales its output by that probability, as ``SwitchTransformersTop1Router``
    does; the experts run routed (:class:`PackedMixedExperts`, ungated), each at its own width.

    No token is dropped: the router's expert capacity is not applied, so an exported program must not see more
    tokens per call than the capacity (``export.seq2seq`` bounds its dynamic dims by it), where the eager model
    drops none either."""

    def __init__(self, router: nn.Linear, experts: PackedMixedExperts):
        super().__init__()
        self.router = router
        self.experts = experts

    def forward(self, hidden_states):  # [B, T, H]
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        probs = torch.softmax(self.router(x.float()), dim=-1)  # [T, E]
        weight, index = probs.max(dim=-1, keepdim=True)  # [T, 1], [T, 1]
        return self.experts(x, index, weight.to(x.dtype)).reshape(shape)


def top1_mlp(block: nn.Module) -> PackedTop1MLP:
    """The export form of a SwitchTransformers sparse MLP (``block.router``, ``block.experts.expert_{e}.wi/.wo``): the
    experts' packed weights stacked into width groups (the same bytes, no repack), or a float stack."""
    from moe_export.tensors import PackedLinearWeight

    experts = [block.experts[f"expert_{e}"] for e in range(len(block.experts))]
    stacks = []
    for proj in ("wi", "wo"):
        weights = [getattr(ex, proj).weight for ex in experts]
        if any(getattr(ex, proj).bias is not None for ex in experts):
            raise NotImplementedError("expert projections with a bias are not exportable yet")
        packed = [isinstance(w, PackedLinearWeight) for w in weights]
        if all(packed):
            if any(w.transposed for w in weights):
                raise NotImplementedError("transposed packed expert weights are not exportable yet")
            groups = [w.width_groups() for w in weights]
            stacks.append(WidthGroups.from_experts([g.expert(0) for g in groups], groups[0].group_size))
        elif not any(packed):
            stacks.append(FloatExpertStack(torch.stack([w.detach() for w in weights])))
        else:
            raise ValueError(f"some experts' {proj} are quantized and some are float; quantize all or none")
    if isinstance(stacks[0], WidthGroups) != isinstance(stacks[1], WidthGroups):
        raise ValueError("only one of wi/wo is quantized; quantize both or neither")
    return PackedTop1MLP(block.router.classifier, PackedMixedExperts(*stacks, experts[0].act, gated=False))


def moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) for every sparse MoE block with a router ``gate`` and fused ``experts``."""
    out = []
    for name, mod in model.named_modules():
        ex = getattr(mod, "experts", None)
        if ex is not None and hasattr(mod, "gate") and (isinstance(ex, PackedMixedExperts) or hasattr(ex, "gate_up_proj")):
            out.append((name, mod))
    return out
