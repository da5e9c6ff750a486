"""Size accounting: the theoretical size of quantized weights and the bytes a model or checkpoint stores.

The theoretical size (README, "Theoretical size") of one quantized ``[N, K]`` weight at ``b`` bits with groups of
``g`` inputs is ``N*K*b/8`` bytes of codes plus a float16 scale per group, plus a float16 zero per group for
asymmetric grids. A weight that is not quantized counts its stored bytes (``numel * itemsize``).

Kept-float rule (one for every path that quantizes or counts non-expert weights): a weight whose role the
non-expert policy gives a width is packed only when it is 2-D and its input dim K is a multiple of 8 (whole
bytes per row for every width) and of the group size; otherwise it stays float in its own dtype.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn


def theoretical_bytes(n: int, k: int, bits: float, group_size: int | None, symmetric: bool) -> float:
    """Theoretical size of one ``[N, K]`` weight: packed bits plus float16 scales, plus float16 zeros for
    asymmetric grids. ``bits`` may be a mean over experts."""
    g = k if group_size is None else group_size
    groups = n * (k // g)
    return n * k * bits / 8 + 2 * groups + (0 if symmetric else 2 * groups)


def packs(shape, group_size: int | None) -> bool:
    """Whether a weight of ``shape`` given a width is packed (the kept-float rule above)."""
    if len(shape) != 2:
        return False
    k = shape[1]
    return k % 8 == 0 and (group_size is None or k % group_size == 0)


def non_expert_bytes(shape, itemsize: int, quant) -> float:
    """Bytes of one non-expert weight of ``shape`` stored at ``itemsize`` bytes an element when float, under
    ``quant`` (a ``NonExpertQuant``, or None for float)."""
    if quant is None or not packs(shape, quant.group_size):
        n = 1
        for d in shape:
            n *= d
        return float(n * itemsize)
    return theoretical_bytes(shape[0], shape[1], quant.bits, quant.group_size, quant.symmetric)


def expert_bytes(model: nn.Module) -> int:
    """Bytes the routed experts of ``model`` hold in memory (packed codes + scales + zeros, or float)."""
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
    """Theoretical size summed over every routed expert weight of ``model`` at the plan's widths."""
    from moe_export.models import find_moe_layers

    total = 0.0
    for layer in find_moe_layers(model):
        for proj in layer.projections:
            g = plan.group_size_for(layer.name, proj)
            for e, b in enumerate(plan.bits_for(layer.name, proj)):
                n, k = layer.expert_weight(proj, e).shape
                total += theoretical_bytes(n, k, b, g, plan.quantizer.symmetric)
    return total


def theoretical_model_bytes(model: nn.Module) -> float:
    """Theoretical size of a quantized model: the formula for every packed weight plus the stored bytes of every
    float parameter and persistent buffer (what a checkpoint of it holds, less the file headers)."""
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    total = 0.0
    for _, p in model.named_parameters():
        if isinstance(p, MixedWidthExpertsTensor):
            n, k = p.out_features, p.in_features
            total += sum(theoretical_bytes(n, k, b, p.group_size, p.symmetric) for b in p.bit_widths)
        elif isinstance(p, PackedLinearWeight):
            total += theoretical_bytes(p.packed.shape[0], p.in_features, p.bits, p.group_size, p.symmetric)
        else:
            total += p.numel() * p.element_size()
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    total += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in non_persistent)
    return total


def safetensors_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the safetensors files in ``folder`` (one file, or shards): a checkpoint's stored size."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def disk_bytes(path: str | os.PathLike) -> int:
    """Bytes of a file, or of every file under a folder (an artifact with its sidecar files)."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size
