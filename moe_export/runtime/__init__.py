"""The mixed-width expert stack and how it runs: one layout, the subclasses that hold it, one dispatch table.

* ``layout``: :class:`~moe_export.runtime.layout.WidthGroups` (per-width packed codes, scales, zeros, expert ->
  (width, slot)), the bit-stream packing, the unpack formulations and the dequantize formula;
* ``tensors``: ``MixedWidthExpertsTensor`` / ``PackedLinearWeight``, thin torchao holders of a layout;
* ``matmul``: plain-torch matmuls straight from packed width groups;
* ``dispatch``: which formulation runs when (device, pairs, compiling, exporting, dtype), the formulations, and
  :func:`register`, the one explicit hook into transformers.

Nothing here registers anything at import: call :func:`register` (``quantize_`` and ``load_quantized`` do).
"""


def register() -> None:
    """Register the ``moe_export_mixed`` experts implementation and the subclasses' transformers ops with
    transformers (idempotent)."""
    from moe_export.runtime.hf import register as _register

    _register()
