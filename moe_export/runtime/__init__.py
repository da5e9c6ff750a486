"""The mixed-width expert stack and how it runs: one layout, the subclasses that hold it, one dispatch table.

* ``layout``: :class:`~moe_export.runtime.layout.WidthGroups` (per-width packed codes, scales, zeros, expert ->
  (width, slot)), the bit-stream packing, the unpack formulations and the dequantize formula;
* ``tensors``: ``MixedWidthExpertsTensor`` / ``PackedLinearWeight``, thin torchao holders of a layout;
* ``matmul``: plain-torch matmuls straight from packed width groups;
* ``dispatch``: which formulation runs when (device, pairs, compiling, exporting, dtype), the formulations, and
  :func:`register`, the one explicit hook into transformers.

Nothing here registers anything at import: call :func:`register` (``quantize_`` and ``load_quantized`` do).
"""

from __future__ import annotations


def register(accuracy: str | None = None) -> None:
    """Register the ``moe_export_mixed`` experts implementation and the subclasses' transformers ops with
    transformers (idempotent). ``accuracy`` ("exact" or "int8"), when given, sets the arithmetic of the CPU
    kernels for this process (``moe_export.kernels.cpu_ops.set_accuracy``; default: ``MOE_EXPORT_ACCURACY``, else
    ``cpu_ops.DEFAULT_ACCURACY``, int8 activations)."""
    from moe_export.runtime.hf import register as _register

    _register()
    if accuracy is not None:
        from moe_export.kernels import cpu_ops

        cpu_ops.set_accuracy(accuracy)
