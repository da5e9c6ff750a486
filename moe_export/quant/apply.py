"""Putting quantized weights into a model: the steps every quantize front end shares.

``quantize_layer_experts`` quantizes one MoE layer's experts at their widths, ``install_quantized_layer`` swaps
the float expert weights for packed subclasses, ``install_fake_quant`` writes the dequantized values into the
float weights instead (to measure a quantizer's error without the packed runtime), and ``quantize_non_expert_``
applies a plan's non-expert policy. ``moe_export.api.quantize_`` (round-to-nearest, HQQ) and
``moe_export.quant.calibration.quantize_sequential`` (GPTQ) both build on these, so neither imports the other.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from moe_export.quant.base import QuantizedWeight, Quantizer

log = logging.getLogger(__name__)

__all__ = ["quantize_layer_experts", "install_quantized_layer", "install_fake_quant", "quantize_non_expert_",
           "for_projection", "non_expert_quantizer", "non_expert_targets"]


def non_expert_quantizer() -> Quantizer:
    """The quantizer of the non-expert weights a plan gives a width (attention, lm_head, embeddings, ...) when the
    experts' quantizer is data-free: round-to-nearest (the streamed path, ``streaming.py``, stores what the
    in-memory one does). A data-aware quantizer (GPTQ) quantizes the non-expert linears whose inputs it measured
    (``quantize_non_expert_(hessians=...)``) and leaves the rest (embeddings, tied weights) to this one. The budget
    allocator scores these weights the same way, so its costs are the errors of the weights that will be stored."""
    from moe_export.quant.rtn import RTNQuantizer

    return RTNQuantizer()


def for_projection(value, proj: str):
    """A layer's widths or group size for one projection stack: ``value[proj]`` when the plan chooses per
    projection (``BitPlan.expert_quant``: a dict), else ``value`` itself (every projection alike)."""
    return value[proj] if isinstance(value, dict) else value


def quantize_layer_experts(layer, bits, quantizer: Quantizer, group_size, symmetric: bool,
                           hessians: dict | None = None) -> dict[str, list[QuantizedWeight]]:
    """Quantize every expert of one ``MoELayer`` at its width: ``{proj: [QuantizedWeight per expert]}``.

    ``bits``: per-expert widths, or ``{proj: per-expert widths}``; ``group_size``: one, or ``{proj: group size}``
    (``BitPlan.expert_quant``). ``hessians[proj][e]``: ``[K, K]`` or None, for data-aware quantizers.
    """
    out: dict[str, list[QuantizedWeight]] = {}
    for proj in layer.projections:
        b, g = for_projection(bits, proj), for_projection(group_size, proj)
        if len(b) != layer.num_experts:
            raise ValueError(f"{layer.name}: {len(b)} widths given for {layer.num_experts} experts")
        qws = []
        for e in range(layer.num_experts):
            h = None if hessians is None else hessians.get(proj, [None] * layer.num_experts)[e]
            w = layer.expert_weight(proj, e)  # [N, K] (out, in)
            qws.append(quantizer.quantize(w, int(b[e]), g, symmetric, hessian=h))
        out[proj] = qws
    return out


def install_quantized_layer(model: nn.Module, layer, qweights: dict[str, list[QuantizedWeight]]) -> None:
    """Replace the float expert weights of ``layer`` by packed subclasses built from ``qweights``."""
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    for proj, qws in qweights.items():
        if layer.fused:
            old = getattr(layer.experts, proj)
            if getattr(layer.experts, "is_transposed", False):
                raise NotImplementedError(f"{layer.name}: transposed expert layouts are not supported yet")
            new = MixedWidthExpertsTensor.from_quantized(qws, dtype=old.dtype)
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"{layer.name}.{proj}: quantized shape {tuple(new.shape)} != {tuple(old.shape)}")
            setattr(layer.experts, proj, nn.Parameter(new, requires_grad=False))
        else:
            for e, qw in enumerate(qws):
                lin = getattr(layer.experts[f"expert_{e}"], proj)
                lin.weight = nn.Parameter(PackedLinearWeight.from_quantized(qw, dtype=lin.weight.dtype),
                                          requires_grad=False)


def install_fake_quant(model: nn.Module, layer, qweights: dict[str, list[QuantizedWeight]]) -> None:
    """Write the dequantized weights into the float expert parameters (same values, float storage)."""
    with torch.no_grad():
        for proj, qws in qweights.items():
            for e, qw in enumerate(qws):
                w = layer.expert_weight(proj, e)
                w.copy_(qw.dequantize(w.dtype))


def _set_param(model: nn.Module, fqn: str, value: nn.Parameter) -> None:
    mod_name, _, attr = fqn.rpartition(".")
    setattr(model.get_submodule(mod_name) if mod_name else model, attr, value)


def non_expert_targets(model: nn.Module, plan) -> list[tuple[list[str], nn.Parameter, object]]:
    """The non-expert weights ``plan`` gives a width: ``(every FQN of the parameter, the parameter, its
    NonExpertQuant)``; a tied parameter once. Expert weights, 1-D parameters, float roles and weights that do not
    pack are left out."""
    from moe_export.models import parameter_role_lookup
    from moe_export.size import packs
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    if plan.non_expert_policy().all_float and not plan.tensors:
        return []
    by_id: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        params[id(p)] = p
    out = []
    role_of = parameter_role_lookup(model)
    for pid, names in by_id.items():
        p = params[pid]
        if isinstance(p, (MixedWidthExpertsTensor, PackedLinearWeight)) or p.dim() != 2:
            continue
        roles = sorted({role_of(n) for n in names})
        quants = [plan.non_expert_quant_for(names, r) for r in roles]
        if any(q != quants[0] for q in quants):
            shown = ["float" if q is None else q.to_dict() for q in quants]
            raise ValueError(f"parameter shared by {names} has roles {roles} with different policies {shown}; "
                             "give these roles the same non_expert policy in the plan")
        q = quants[0]
        if q is None:
            continue
        if not packs(p.shape, q.group_size):
            # e.g. T5 relative-attention bias tables [buckets, heads]: too small to pack, kept float
            log.warning("%s: input dim %d is not a multiple of 8 and of group size %s; kept float",
                        names[0], p.shape[1], q.group_size)
            continue
        out.append((names, p, q))
    return out


def quantize_non_expert_(model: nn.Module, plan, quantizer: Quantizer | None = None,
                         hessians: dict | None = None) -> list[str]:
    """Quantize 2-D weights of the roles the plan's ``non_expert`` policy gives a width; returns their FQNs.

    Tied parameters (e.g. embeddings and lm_head) are quantized once and stay tied. ``hessians``: FQN -> ``[K, K]``
    of the linears a data-aware ``quantizer`` (GPTQ) measured inputs for; it quantizes those, RTN the rest
    (``non_expert_quantizer``). Without ``hessians``: ``quantizer`` (default RTN) quantizes every one.
    """
    from moe_export.tensors import PackedLinearWeight

    done = []
    for names, p, q in non_expert_targets(model, plan):
        h = hessians.get(names[0]) if hessians is not None and len(names) == 1 else None
        qz = (quantizer if h is not None else non_expert_quantizer()) if hessians is not None else \
            (quantizer or non_expert_quantizer())
        qw = qz.quantize(p.detach(), q.bits, q.group_size, q.symmetric, hessian=h)
        new = nn.Parameter(PackedLinearWeight.from_quantized(qw, dtype=p.dtype), requires_grad=False)
        for n in names:
            _set_param(model, n, new)
        done.extend(names)
    return done
