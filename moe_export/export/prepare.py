"""From a quantized model (``moe_export.api.quantize_``) to the module tree the exporters trace, and the
theoretical size every artifact is checked against.

The subclasses of ``moe_export.tensors`` are for eager/compile; for export their bytes move into plain
buffers of :class:`~moe_export.export.experts.PackedMixedExperts` / :class:`PackedLinear`, whose forward is
static-shape and uses only ops every target has (export-notes.md: XNNPACK lowers tensor subclasses to
wrong answers, and shifts are not Core ATen).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_export.export.experts import MixedWidthWeight, PackedMixedExperts, moe_blocks, top1_mlp
from moe_export.runtime.layout import WidthGroups
from moe_export.size import theoretical_bytes


class PackedLinear(nn.Module):
    """A non-expert linear whose weight the plan quantized (e.g. shared experts at 8 bits)."""

    def __init__(self, groups: WidthGroups, bias: torch.Tensor | None):
        super().__init__()
        self.weight_q = MixedWidthWeight(groups)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        w = self.weight_q.gather(torch.zeros(1, dtype=torch.long))[0]  # [N, K]
        return F.linear(x, w.to(x.dtype), self.bias)


class PackedEmbedding(nn.Module):
    """An embedding table whose weight the plan quantized: one packed row per token (a stack of V one-row
    "experts", so only the looked-up rows are gathered and unpacked)."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                 group_size: int | None, dtype: torch.dtype):
        super().__init__()
        vocab = packed.shape[0]
        groups = WidthGroups({bits: packed.unsqueeze(1)}, {bits: scale.unsqueeze(1)},
                             {bits: None if zero is None else zero.unsqueeze(1)}, (bits,) * vocab, group_size)
        self.weight_q = MixedWidthWeight(groups)  # [V, 1, H*b/8]
        self.dtype = dtype

    def forward(self, ids):  # [...] -> [..., H]
        rows = self.weight_q.gather(ids.reshape(-1))  # [S, 1, H]
        return rows.reshape(*ids.shape, self.weight_q.k).to(self.dtype)


# The exported step computes in float32 whatever the checkpoint's dtype: onnxruntime's CPU provider has no
# bfloat16 kernels (a bfloat16 step fails at session start: NOT_IMPLEMENTED for Sub), numpy (its Python feed) has
# no bfloat16, and ExecuTorch's portable bfloat16 kernels are scalar loops. Upcasting is exact, and the packed
# experts keep their bytes (uint8 codes, float16 scales and zeros), so only the float weights grow.
HALF_DTYPES = (torch.bfloat16, torch.float16)


def to_float32_(model: nn.Module) -> nn.Module:
    """Upcast the bfloat16/float16 weights and buffers of ``model`` to float32 in place (tied weights stay tied);
    a quantized weight keeps its stored parts and computes in float32; the export buffers of packed weights
    (:class:`MixedWidthWeight`: float16 scales) are left as they are. Returns ``model``."""
    done: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        if isinstance(mod, MixedWidthWeight):
            continue
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is None or t.dtype not in HALF_DTYPES:
                    continue
                if id(t) not in done:
                    up = t.detach().float()
                    done[id(t)] = nn.Parameter(up, requires_grad=False) if isinstance(t, nn.Parameter) else up
                table[name] = done[id(t)]
    if getattr(model, "config", None) is not None and getattr(model.config, "dtype", None) in HALF_DTYPES:
        model.config.dtype = torch.float32
    return model


def float32_copy(model: nn.Module) -> nn.Module:
    """``model`` itself when it computes in float32, else a float32 copy (:func:`to_float32_`): the model the
    exported step reproduces, and what its parity is checked against."""
    if not any(t.dtype in HALF_DTYPES for t in model.parameters()):
        return model
    return to_float32_(copy.deepcopy(model))


def prepare_for_export(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every packed weight as exportable buffers, computing in float32 (:data:`HALF_DTYPES`
    models are upcast); float models are returned as a copy switched to the ``batched_mm`` experts implementation
    (static shapes)."""
    from moe_export.models import SWITCH_BLOCKS
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    model = to_float32_(copy.deepcopy(model).eval())
    for name, block in moe_blocks(model):
        ex = block.experts
        if isinstance(ex, PackedMixedExperts):
            continue
        gu, down = ex.gate_up_proj, ex.down_proj
        if isinstance(gu, MixedWidthExpertsTensor) and isinstance(down, MixedWidthExpertsTensor):
            if gu.transposed or down.transposed:
                raise NotImplementedError(f"{name}: transposed expert stacks are not exportable yet")
            block.experts = PackedMixedExperts(gu.width_groups(), down.width_groups(), ex.act_fn)  # the same bytes, no repack
        elif isinstance(gu, MixedWidthExpertsTensor) or isinstance(down, MixedWidthExpertsTensor):
            raise ValueError(f"{name}: only one of gate_up_proj/down_proj is quantized; quantize both or neither")
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ in SWITCH_BLOCKS:  # one module per expert: stacked into the routed top-1 form
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, top1_mlp(mod))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and isinstance(mod.weight, PackedLinearWeight):
            w = mod.weight
            if w.transposed:
                raise NotImplementedError(f"{name}: transposed packed linear weights are not exportable yet")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    PackedLinear(w.width_groups(), mod.bias))
        elif isinstance(mod, nn.Embedding) and isinstance(mod.weight, PackedLinearWeight):
            w = mod.weight
            if w.transposed or mod.max_norm is not None:
                raise NotImplementedError(f"{name}: this packed embedding (transposed or max_norm) is not exportable")
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr,
                    PackedEmbedding(w.packed, w.scale, w.zero, w.bits, w.group_size, w.dtype))
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        if not any(isinstance(b.experts, PackedMixedExperts) for _, b in moe_blocks(model)):
            model.set_experts_implementation("batched_mm")
    return model


def theoretical_size(model: nn.Module) -> dict[str, float]:
    """docs/architecture.md formula for a prepared model: ``{"packed": ..., "float": ..., "total": ...}`` bytes.

    Packed weights count ``N*K*b/8`` plus float16 scales (and zeros); everything else its stored bytes
    (tied parameters once). Non-persistent buffers (index tables, rotary frequencies) are not weights.
    """
    packed = 0.0
    packed_ids = set()
    for mod in model.modules():
        if isinstance(mod, MixedWidthWeight):
            n, k = mod.n, mod.k
            for b in mod.widths:
                scale, zero = getattr(mod, f"scale_{b}"), getattr(mod, f"zero_{b}")
                g = k // scale.shape[-1]
                packed += scale.shape[0] * theoretical_bytes(n, k, b, g, zero is None)
                packed_ids.update(id(t) for t in (getattr(mod, f"packed_{b}"), scale, zero) if t is not None)
    flt = 0
    seen = packed_ids | {id(t) for t in _non_persistent(model)}
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) not in seen:
            seen.add(id(p))
            flt += p.numel() * p.element_size()
    return {"packed": packed, "float": float(flt), "total": packed + flt}


def _non_persistent(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for mod in model.modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            t = getattr(mod, name, None)
            if t is not None:
                out.append(t)
    return out
