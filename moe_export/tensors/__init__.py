"""torchao tensor subclasses holding packed int-N weights: 2-D linear weights and mixed-width expert stacks."""

from moe_export.tensors.mixed_width_experts_tensor import MixedWidthExpertsTensor
from moe_export.tensors.packed_linear_tensor import PackedLinearWeight

__all__ = ["MixedWidthExpertsTensor", "PackedLinearWeight"]
