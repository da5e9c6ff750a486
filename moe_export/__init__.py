"""Per-expert mixed-precision quantization of Mixture-of-Experts models.

    from moe_export import BitPlan, MoEQuantConfig, quantize_
    quantize_(model, MoEQuantConfig(plan="plan.json", quantizer="rtn"))

Names are imported on first use so that ``import moe_export`` (and the CLI) stays light.

After ``import moe_export``, transformers' ``from_pretrained`` loads quantized folders (``quant_method:
"moe_export"`` in their ``config.json``): the quantizer is registered the moment transformers loads its
quantizer table (``moe_export.hf.register``), or at once if transformers already has.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_LAZY = {
    "quantize_": "moe_export.api",
    "MoEQuantConfig": "moe_export.api",
    "BitPlan": "moe_export.plan.bitplan",
    "save_quantized": "moe_export.checkpoint",
    "load_quantized": "moe_export.hf",
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


# --- transformers learns quant_method "moe_export" -------------------------------------------------------
# Importing transformers costs seconds, which `import moe_export` (and every CLI call) should not pay; so the
# quantizer is registered right after transformers itself imports its quantizer table, whenever that happens.

_QUANTIZER_TABLE = "transformers.quantizers.auto"


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of transformers' quantizer table so that ``moe_export.hf.register``
    runs once that module has executed, then steps out of ``sys.meta_path``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _QUANTIZER_TABLE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            from moe_export.hf import register

            register()

        spec.loader.exec_module = exec_then_register
        return spec


def _arrange_registration() -> None:
    if _QUANTIZER_TABLE in sys.modules:
        from moe_export.hf import register

        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_arrange_registration()
