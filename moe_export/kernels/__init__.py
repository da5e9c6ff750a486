"""Device code for mixed-width expert matmuls, imported as ``moe_export.kernels``. It depends on the layout
(``moe_export.runtime.layout``), never the reverse; which kernel runs when is ``moe_export.runtime.dispatch``.

* ``ops``: the ``torch.library`` custom ops ``moe_export::mixed_width_gather_mm`` (decode) and
  ``moe_export::mixed_width_grouped_mm`` (prefill), with fake kernels; CUDA runs Triton, CPU runs
  ``reference`` (plain torch, the layout's reference dequantize).
* ``cpu_ops`` + ``cpu_mixed_width.cpp``: the C++ CPU ops (``cpu_mixed_width_gemv``, ``cpu_moe_ffn``,
  ``cpu_packed_linear``), built on first use.
* ``mixed_width_matmul``: the Triton kernels and launchers (imported lazily: Triton reads
  ``TRITON_INTERPRET`` when the kernels are defined).
* ``aot``: compile every kernel for sm80/sm90 without a GPU (registers, spills, shared memory).
"""

import importlib.util

from moe_export.kernels import ops
from moe_export.kernels.ops import mixed_width_gather_mm, mixed_width_grouped_mm

HAS_TRITON = importlib.util.find_spec("triton") is not None

__all__ = ["HAS_TRITON", "mixed_width_gather_mm", "mixed_width_grouped_mm", "ops"]
