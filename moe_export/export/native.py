"""The native ``.pte`` form: every packed weight runs in a ``moe_export`` ExecuTorch kernel straight from its codes.

* each MoE block's experts -> one ``moe_export::mixed_width_moe`` (the routed experts only, every width group in
  one call; the HF router before it stays float),
* each packed non-expert linear (attention, lm_head at the plan's widths) -> ``moe_export::packed_linear``,
* a quantized embedding table -> ``moe_export::packed_embedding`` (the looked-up rows only).

The ops' buffers are the prepared model's tensors (no copy, no repack): the program stores every code once, at
its width, as a constant. The float parts (attention math, norms, router, float linears) go to XNNPACK. Nothing
the size of a dequantized expert exists at run time, so the memory plan does not grow with experts x tokens.
The ops and their kernels: ``export.ops.define_native_ops`` (schemas, eager and fake kernels) and
``moe_export/kernels/et_ops.cpp`` (the ExecuTorch kernels, built and loaded by ``moe_export.kernels.et_native``).
"""

from __future__ import annotations


import torch
import torch.nn as nn

from moe_export.export.experts import MixedWidthWeight, PackedMixedExperts
from moe_export.export.ops import NATIVE_ACCURACY, define_native_ops
from moe_export.export.wrapper import copy_sharing_tensors
from moe_export.runtime.layout import slot_numbering

NATIVE_OPS = ("moe_export::mixed_width_moe.out", "moe_export::packed_linear.out", "moe_export::packed_embedding.out")


def _register_groups(module: nn.Module, prefix: str, w: MixedWidthWeight) -> None:
    """``w``'s width groups as ``{prefix}packed_{b}`` / ``scale_{b}`` / ``zero_{b}`` buffers (the same tensors)."""
    for b in w.widths:
        for kind in ("packed", "scale", "zero"):
            module.register_buffer(f"{prefix}{kind}_{b}", getattr(w, f"{kind}_{b}"))


def _group_lists(module: nn.Module, prefix: str, widths) -> list[list]:
    return [[getattr(module, f"{prefix}{kind}_{b}") for b in widths] for kind in ("packed", "scale", "zero")]


class NativeExperts(nn.Module):
    """Drop-in for the HF experts module: ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``
    -> ``[T, H]`` through ``moe_export::mixed_width_moe`` (SwiGLU experts: SiLU(gate) * up, gate rows first)."""

    def __init__(self, experts: PackedMixedExperts, accuracy: int = 0):
        super().__init__()
        from transformers.activations import SiLUActivation

        define_native_ops()
        up, down = experts.gate_up_proj, experts.down_proj
        if not isinstance(experts.act_fn, (SiLUActivation, nn.SiLU)):
            raise ValueError(f"native experts compute SwiGLU (SiLU); this block's activation is "
                             f"{type(experts.act_fn).__name__}: export it with --pte-mode xnnpack")
        if up.expert_bits != down.expert_bits:
            raise ValueError("native experts need gate_up_proj and down_proj of an expert at the same width")
        if up.coded or down.coded:
            raise ValueError("expert weights were converted to packed zero codes; build the native form from a "
                             "fresh prepare_for_export")
        self.widths = list(up.widths)
        self.expert_bits = list(up.expert_bits)
        self.slots = list(slot_numbering(self.expert_bits)[0])
        self.num_experts = len(self.expert_bits)
        self.accuracy = accuracy
        _register_groups(self, "up_", up)
        _register_groups(self, "down_", down)

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, k], [T, k] -> [T, H]
        x = hidden_states.float()
        out = torch.ops.moe_export.mixed_width_moe(
            x, top_k_index.long(), top_k_weights.float(), *_group_lists(self, "up_", self.widths),
            *_group_lists(self, "down_", self.widths), self.widths, self.expert_bits, self.slots, self.accuracy)
        return out.to(hidden_states.dtype)


class NativeLinear(nn.Module):
    """A packed 2-D linear through ``moe_export::packed_linear`` (bias added after the op)."""

    def __init__(self, w: MixedWidthWeight, bias: torch.Tensor | None, accuracy: int = 0):
        super().__init__()
        define_native_ops()
        if w.num_experts != 1:
            raise ValueError(f"a packed linear holds one weight, got a stack of {w.num_experts}")
        (self.bits,) = w.widths
        # [1, N, K*b/8] -> [N, K*b/8]: views of the prepared model's buffers
        z = getattr(w, f"zero_{self.bits}")
        self.register_buffer("packed", getattr(w, f"packed_{self.bits}")[0])
        self.register_buffer("scale", getattr(w, f"scale_{self.bits}")[0])
        self.register_buffer("zero", None if z is None else z[0])
        self.bias = bias
        self.accuracy = accuracy

    def forward(self, x):  # [..., K] -> [..., N]
        y = torch.ops.moe_export.packed_linear(x.float(), self.packed, self.scale, self.zero, self.bits, self.accuracy)
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class NativeEmbedding(nn.Module):
    """A packed embedding table through ``moe_export::packed_embedding``."""

    def __init__(self, w: MixedWidthWeight, dtype: torch.dtype):
        super().__init__()
        define_native_ops()
        (self.bits,) = w.widths
        # [V, 1, H*b/8] (one expert per row, export.prepare.PackedEmbedding) -> [V, H*b/8]
        z = getattr(w, f"zero_{self.bits}")
        self.register_buffer("packed", getattr(w, f"packed_{self.bits}")[:, 0])
        self.register_buffer("scale", getattr(w, f"scale_{self.bits}")[:, 0])
        self.register_buffer("zero", None if z is None else z[:, 0])
        self.dtype = dtype

    def forward(self, ids):  # [...] -> [..., H]
        return torch.ops.moe_export.packed_embedding(ids, self.packed, self.scale, self.zero, self.bits).to(self.dtype)


def to_native(model: nn.Module, accuracy: str = "exact") -> nn.Module:
    """A copy of a prepared model (or ``DecoderStep``) whose packed experts, packed linears and packed embeddings
    run as the native ops. The copy shares every parameter and buffer with ``model``: no weight is duplicated."""
    from moe_export.export.prepare import PackedEmbedding, PackedLinear

    if accuracy not in NATIVE_ACCURACY:
        raise ValueError(f"unknown native accuracy {accuracy!r}; choose one of {', '.join(NATIVE_ACCURACY)}")
    acc = NATIVE_ACCURACY[accuracy]
    model = copy_sharing_tensors(model)
    for name, mod in list(model.named_modules()):
        if isinstance(getattr(mod, "experts", None), PackedMixedExperts):
            mod.experts = NativeExperts(mod.experts, acc)
        new = None
        if isinstance(mod, PackedLinear):
            new = NativeLinear(mod.weight_q, mod.bias, acc)
        elif isinstance(mod, PackedEmbedding):
            new = NativeEmbedding(mod.weight_q, mod.dtype)
        if new is not None:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
    return model
