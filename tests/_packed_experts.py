"""Test models with packed experts, built by the production path: ``MixedWidthExpertsTensor.from_hp`` per expert
stack (what ``quantize_`` installs), then ``prepare_for_export`` (what export runs)."""

import copy

import torch
import torch.nn as nn

from moe_export.export.experts import PackedMixedExperts, moe_blocks
from moe_export.export.prepare import prepare_for_export
from moe_export.quant.base import get_quantizer
from moe_export.tensors import MixedWidthExpertsTensor


def quantize_experts_(model: nn.Module, bits, group_size=32, symmetric=False, quantizer="rtn") -> nn.Module:
    """The prepared (exportable) model whose MoE blocks hold :class:`PackedMixedExperts`. ``bits``: per layer name a
    list of per-expert widths, one list for every layer, or one width."""
    q = get_quantizer(quantizer)
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError("no MoE block with fused experts (gate_up_proj/down_proj) found in the model")
    for name, block in blocks:
        ex = block.experts
        layer_bits = bits[name] if isinstance(bits, dict) else bits
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(ex, proj)
            packed = MixedWidthExpertsTensor.from_hp(w.detach().float(), layer_bits, group_size, symmetric, q,
                                                     dtype=w.dtype)
            setattr(ex, proj, nn.Parameter(packed, requires_grad=False))
    return prepare_for_export(model)


def dequantized_reference(float_model: nn.Module, packed_model: nn.Module) -> nn.Module:
    """A copy of ``float_model`` whose experts hold the weights of ``packed_model`` dequantized (the layout's reference
    dequantize), run by HF's own expert code: an independent eager reference for the packed experts."""
    ref = copy.deepcopy(float_model)
    packed = dict(moe_blocks(packed_model))
    for name, block in moe_blocks(ref):
        src = packed[name].experts
        assert isinstance(src, PackedMixedExperts), f"{name}: {type(src).__name__}"
        with torch.no_grad():
            for proj in ("gate_up_proj", "down_proj"):
                layout = getattr(src, proj).width_groups()
                getattr(block.experts, proj).copy_(torch.stack([layout.dequantize_expert(e)
                                                                for e in range(layout.num_experts)]))
    return ref
