"""One call: ``quantize_(model, MoEQuantConfig(plan=..., quantizer=...))``.

Routed experts get the plan's per-expert widths, stored packed (``MixedWidthExpertsTensor`` for fused
``[E, N, K]`` parameters, ``PackedLinearWeight`` per expert for SwitchTransformers); every other weight
follows the plan's ``non_expert`` policy ("float", or ``{"bits", "group_size", "symmetric"}``). The model
is switched to the ``moe_export_mixed`` experts implementation and keeps its plan in ``model.moe_export_plan``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from moe_export.quant.apply import install_quantized_layer, non_expert_targets, quantize_layer_experts, \
    quantize_non_expert_
from moe_export.quant.base import Quantizer, get_quantizer

__all__ = ["MoEQuantConfig", "quantize_", "calibration_batches_for"]


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


def calibration_batches_for(model: nn.Module, cal, tokenizer=None) -> torch.Tensor:
    """Calibration token ids ``[B, S]`` for ``model``: ``cal.n_tokens`` tokens of zoo text.

    The corpus and window length come from ``cal``, else from the zoo manifest beside the model's folder (its
    fine-tune corpus and training length), else the defaults of ``zoo.data.calibration_batches``. The text is
    tokenized with ``tokenizer``, else with the tokenizer saved in the model's folder.
    """
    from moe_export.zoo.data import calibration_batches
    from moe_export.zoo.folders import find_manifest

    src = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception as exc:  # noqa: BLE001 - reported as one actionable message
            raise ValueError(
                f"calibration needs text: no tokenizer found at the model's path {src!r} ({exc}); "
                "set CalibrationConfig.batches=LongTensor[B, T] or pass tokenizer="
            ) from exc
    entry = find_manifest(src).get("entry", {})
    corpus = cal.corpus or entry.get("finetune", {}).get("corpus")
    seq_len = cal.seq_len or entry.get("seq_len") or min(256, getattr(model.config, "max_position_embeddings", 256))
    kwargs = {} if corpus is None else {"corpus": corpus}
    return calibration_batches(tokenizer, cal.n_tokens, seq_len, cal.seed, **kwargs)


def quantize_(model: nn.Module, config: MoEQuantConfig, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place by ``config.plan``; returns it."""
    from moe_export.models import find_moe_layers

    from moe_export.runtime import register as register_runtime

    register_runtime()  # the experts implementation, with transformers

    if not isinstance(config, MoEQuantConfig):
        raise TypeError(f"quantize_ expects a MoEQuantConfig, got {type(config).__name__}")
    plan = _resolve_plan(config.plan)
    quantizer = _resolve_quantizer(config.quantizer, config.quantizer_options)
    plan.validate()
    plan.validate_against(model)
    sym = plan.quantizer.symmetric
    if plan.quantizer.name != quantizer.name:
        plan.provenance = {**plan.provenance, "quantized_with": quantizer.name}
    with torch.no_grad():
        if quantizer.needs_calibration:
            from moe_export.eval import logits_fn_for
            from moe_export.quant.calibration import linear_hessians, quantize_sequential, resolve_calibration

            from moe_export.kernels import cpu_ops

            cal = resolve_calibration(config.calibration)
            batches = cal.batches if cal.batches is not None else calibration_batches_for(model, cal)
            # layers quantized so far feed the next ones' calibration inputs in the exact arithmetic: the
            # checkpoint must not depend on the process's inference default (int8 activations)
            with cpu_ops.use_accuracy("exact"):
                quantize_sequential(model, plan, quantizer, cal, batches=batches, forward=logits_fn_for(model),
                                    progress=progress)
                # then the non-expert linears the plan gives a width, on the inputs of the quantized experts
                # (a tied weight serves two roles with different inputs: RTN, as data-free plans store it)
                linears = [names[0] for names, _, _ in non_expert_targets(model, plan) if len(names) == 1]
                hessians = linear_hessians(model, linears, batches.long(), logits_fn_for(model), cal.batch_size) \
                    if linears else {}
            quantize_non_expert_(model, plan, quantizer, hessians)
            if hessians:
                plan.provenance["calibration"]["non_expert"] = sorted(hessians)
        else:
            layers = find_moe_layers(model)
            for layer in tqdm(layers, desc=f"{quantizer.name} experts", disable=not progress):
                bits, groups = plan.expert_quant(layer.name, layer.projections)
                qweights = quantize_layer_experts(layer, bits, quantizer, groups, sym)
                install_quantized_layer(model, layer, qweights)
            quantize_non_expert_(model, plan)
    if hasattr(model, "set_experts_implementation") and model._can_set_experts_implementation():
        model.set_experts_implementation("moe_export_mixed")
    model.moe_export_plan = plan
    return model
