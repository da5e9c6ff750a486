"""One call: ``quantize_(model, MoEQuantConfig(plan=..., quantizer=...))``.

Routed experts get the plan's per-expert widths, stored packed (``MixedWidthExpertsTensor`` for fused
``[E, N, K]`` parameters, ``PackedLinearWeight`` per expert for SwitchTransformers); every other weight
follows the plan's ``non_expert`` policy ("float", or ``{"bits", "group_size", "symmetric"}``). The model
is switched to the ``moe_export_mixed`` experts implementation and keeps its plan in ``model.moe_export_plan``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_export.quant.base import QuantizedWeight, Quantizer, get_quantizer

log = logging.getLogger(__name__)

__all__ = ["MoEQuantConfig", "quantize_", "quantize_layer_experts", "install_quantized_layer", "quantize_non_expert_"]


@dataclass
class MoEQuantConfig:
    plan: Any  # BitPlan | str | os.PathLike
    quantizer: str | Quantizer = "rtn"
    quantizer_options: dict = field(default_factory=dict)
    calibration: Any = None  # moe_export.quant.calibration.CalibrationConfig for data-aware quantizers


def _resolve_plan(plan):
    from moe_export.plan.bitplan import BitPlan

    if isinstance(plan, BitPlan):
        return plan
    if isinstance(plan, (str, os.PathLike)):
        return BitPlan.load(plan)
    raise TypeError(f"MoEQuantConfig.plan must be a BitPlan or a path to a bit plan JSON, got {type(plan).__name__}")


def _resolve_quantizer(q, options) -> Quantizer:
    if isinstance(q, Quantizer):
        return q
    if isinstance(q, str):
        return get_quantizer(q, **dict(options or {}))
    raise TypeError(f"MoEQuantConfig.quantizer must be a name such as 'rtn' or a Quantizer, got {type(q).__name__}")


def quantize_layer_experts(layer, bits: list[int], quantizer: Quantizer, group_size: int | None, symmetric: bool,
                           hessians: dict | None = None) -> dict[str, list[QuantizedWeight]]:
    """Quantize every expert of one ``MoELayer`` at its width: ``{proj: [QuantizedWeight per expert]}``.

    ``hessians[proj][e]``: ``[K, K]`` or None, for data-aware quantizers.
    """
    if len(bits) != layer.num_experts:
        raise ValueError(f"{layer.name}: {len(bits)} widths given for {layer.num_experts} experts")
    out: dict[str, list[QuantizedWeight]] = {}
    for proj in layer.projections:
        qws = []
        for e in range(layer.num_experts):
            h = None if hessians is None else hessians.get(proj, [None] * layer.num_experts)[e]
            w = layer.expert_weight(proj, e)  # [N, K] (out, in)
            qws.append(quantizer.quantize(w, int(bits[e]), group_size, symmetric, hessian=h))
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


def _set_param(model: nn.Module, fqn: str, value: nn.Parameter) -> None:
    mod_name, _, attr = fqn.rpartition(".")
    setattr(model.get_submodule(mod_name) if mod_name else model, attr, value)


def quantize_non_expert_(model: nn.Module, plan, quantizer: Quantizer | None = None) -> list[str]:
    """Quantize 2-D weights of the roles the plan's ``non_expert`` policy gives a width; returns their FQNs.

    Tied parameters (e.g. embeddings and lm_head) are quantized once and stay tied.
    """
    from moe_export.models import parameter_role
    from moe_export.quant.rtn import RTNQuantizer
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    quantizer = quantizer or RTNQuantizer()
    if all(v == "float" for v in plan.non_expert.values()):
        return []
    by_id: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        params[id(p)] = p
    done = []
    for pid, names in by_id.items():
        p = params[pid]
        if isinstance(p, (MixedWidthExpertsTensor, PackedLinearWeight)) or p.dim() != 2:
            continue
        roles = sorted({parameter_role(model, n) for n in names})
        policies = [plan.non_expert.get(r, "float") for r in roles]
        if any(pol != policies[0] for pol in policies):
            raise ValueError(f"parameter shared by {names} has roles {roles} with different policies {policies}; "
                             "give these roles the same non_expert policy in the plan")
        policy = policies[0]
        if policy == "float":
            continue
        bits, gs, sym = int(policy["bits"]), policy.get("group_size"), bool(policy.get("symmetric", False))
        k = p.shape[1]
        if k % 8 or (gs is not None and k % gs):
            # e.g. T5 relative-attention bias tables [buckets, heads]: too small to pack, kept float
            log.warning("%s: input dim %d is not a multiple of 8 and of group size %s; kept float", names[0], k, gs)
            continue
        qw = quantizer.quantize(p.detach(), bits, gs, sym)
        new = nn.Parameter(PackedLinearWeight.from_quantized(qw, dtype=p.dtype), requires_grad=False)
        for n in names:
            _set_param(model, n, new)
        done.extend(names)
    return done


def quantize_(model: nn.Module, config: MoEQuantConfig, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place by ``config.plan``; returns it."""
    from moe_export.models import find_moe_layers

    import moe_export.experts  # noqa: F401  (registers the experts implementation)

    if not isinstance(config, MoEQuantConfig):
        raise TypeError(f"quantize_ expects a MoEQuantConfig, got {type(config).__name__}")
    plan = _resolve_plan(config.plan)
    quantizer = _resolve_quantizer(config.quantizer, config.quantizer_options)
    plan.validate()
    plan.validate_against(model)
    gs, sym = plan.quantizer.group_size, plan.quantizer.symmetric
    if plan.quantizer.name != quantizer.name:
        plan.provenance = {**plan.provenance, "quantized_with": quantizer.name}
    with torch.no_grad():
        if quantizer.needs_calibration:
            from moe_export.quant.calibration import quantize_sequential

            quantize_sequential(model, MoEQuantConfig(plan, quantizer, config.quantizer_options, config.calibration),
                                progress=progress)
        else:
            layers = find_moe_layers(model)
            for layer in tqdm(layers, desc=f"{quantizer.name} experts", disable=not progress):
                qweights = quantize_layer_experts(layer, plan.bits_for(layer.name), quantizer, gs, sym)
                install_quantized_layer(model, layer, qweights)
        quantize_non_expert_(model, plan)
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation("moe_export_mixed")
    model.moe_export_plan = plan
    return model


def expert_bytes(model: nn.Module) -> int:
    """Bytes the routed experts of ``model`` hold (packed codes + scales + zeros, or float)."""
    from moe_export.models import find_moe_layers
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    total = 0
    for layer in find_moe_layers(model):
        if layer.fused:
            ps = [getattr(layer.experts, p) for p in layer.projections]
        else:
            ps = [getattr(layer.experts[f"expert_{e}"], p).weight for e in range(layer.num_experts)
                  for p in layer.projections]
        for p in ps:
            if isinstance(p, (MixedWidthExpertsTensor, PackedLinearWeight)):
                total += p.nbytes_stored()
            else:
                total += p.numel() * p.element_size()
    return total


def theoretical_expert_bytes(model: nn.Module, plan) -> float:
    """README formula summed over every routed expert weight: ``N*K*b/8 + N*(K/g)*2 (+ N*(K/g)*2 zeros)``."""
    from moe_export.models import find_moe_layers
    from moe_export.quant.base import theoretical_bytes

    total = 0.0
    for layer in find_moe_layers(model):
        bits = plan.bits_for(layer.name)
        for proj in layer.projections:
            for e, b in enumerate(bits):
                n, k = layer.expert_weight(proj, e).shape
                total += theoretical_bytes(n, k, b, plan.quantizer.group_size, plan.quantizer.symmetric)
    return total
