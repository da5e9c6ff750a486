"""Triton kernels for mixed-width expert matmuls, imported as ``moe_export.kernels``."""
