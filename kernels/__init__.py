"""Triton kernels for mixed-width expert matmuls, imported as ``moe_export.kernels``.

* ``ops``: the ``torch.library`` custom ops ``moe_export::mixed_width_gather_mm`` (decode) and
  ``moe_export::mixed_width_grouped_mm`` (prefill), with fake kernels; CUDA runs Triton, CPU runs
  ``reference`` (plain torch).
* ``moe.mixed_experts_forward``: the CUDA path of the ``moe_export_mixed`` experts implementation.
* ``mixed_width_matmul``: the Triton kernels and launchers (imported lazily: Triton reads
  ``TRITON_INTERPRET`` when the kernels are defined).
* ``aot``: compile every kernel for sm80/sm90 without a GPU (registers, spills, shared memory).

``mixed_experts_forward`` exists only where Triton is installed, so the experts implementation falls
back to its plain-torch path (its import of it fails) on a CUDA machine without Triton.
"""

import importlib.util

from moe_export.kernels import ops
from moe_export.kernels.ops import mixed_width_gather_mm, mixed_width_grouped_mm

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON", "mixed_width_gather_mm", "mixed_width_grouped_mm", "ops"]

if HAS_TRITON:
    from moe_export.kernels.moe import DECODE_MAX_PAIRS, mixed_experts_forward

    mixed_width_experts_forward = mixed_experts_forward
    __all__ += ["DECODE_MAX_PAIRS", "mixed_experts_forward", "mixed_width_experts_forward"]
