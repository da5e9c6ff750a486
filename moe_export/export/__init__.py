"""ExecuTorch (.pte) and ONNX export of packed mixed-width MoE models, runners for the artifacts, parity.

    from moe_export.export import export_pte, export_onnx, prepare_for_export
    m = prepare_for_export(qmodel)            # packed subclasses -> exportable buffers
    export_pte(m, "model.pte", mode="packed")  # or "xnnpack", or "xnnpack-int" (int4-exact experts on XNNPACK)
    export_onnx(m, "model.onnx")               # or mode="fast": MatMulNBits experts, accuracy_level=4

Imports are lazy: executorch and onnx load only when used.
"""

from __future__ import annotations

_LAZY = {
    "export_pte": "moe_export.export.executorch",
    "pte_ops": "moe_export.export.executorch",
    "PTE_MODES": "moe_export.export.executorch",
    "export_onnx": "moe_export.export.onnx",
    "ONNX_MODES": "moe_export.export.onnx",
    "to_nbits_experts": "moe_export.export.fast",
    "to_xnnpack_int_experts": "moe_export.export.fast",
    "onnx_ops": "moe_export.export.onnx",
    "prepare_for_export": "moe_export.export.prepare",
    "theoretical_size": "moe_export.export.prepare",
    "DecoderStep": "moe_export.export.wrapper",
    "export_artifacts": "moe_export.export.pipeline",
    "format_report": "moe_export.export.pipeline",
    "open_runner": "moe_export.export.runners",
    "logits_fn": "moe_export.export.runners",
    "greedy_generate": "moe_export.export.runners",
    "compare": "moe_export.export.parity",
    "check_parity": "moe_export.export.parity",
    "ParityError": "moe_export.export.parity",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_export.export' has no attribute {name!r}")
