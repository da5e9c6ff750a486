"""The packed tensor subclasses under the names checkpoints record (``moe_export.tensors.<class>``); they live in
``moe_export.runtime.tensors``."""

from moe_export.runtime.tensors import MixedWidthExpertsTensor, PackedLinearWeight

__all__ = ["MixedWidthExpertsTensor", "PackedLinearWeight"]
