"""Per-expert mixed-precision quantization of Mixture-of-Experts models.

    from moe_export import BitPlan, MoEQuantConfig, quantize_
    quantize_(model, MoEQuantConfig(plan="plan.json", quantizer="rtn"))

Names are imported on first use so that ``import moe_export`` (and the CLI) stays light.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "quantize_": "moe_export.api",
    "MoEQuantConfig": "moe_export.api",
    "BitPlan": "moe_export.plan.bitplan",
    "save_quantized": "moe_export.checkpoint",
    "load_quantized": "moe_export.checkpoint",
    "MixedWidthExpertsTensor": "moe_export.tensors",
    "PackedLinearWeight": "moe_export.tensors",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'moe_export' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
