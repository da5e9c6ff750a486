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
