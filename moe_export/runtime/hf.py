"""The transformers side of the runtime: the ``moe_export_mixed`` experts implementation and :func:`register`.

A quantized model switches to it with ``model.set_experts_implementation("moe_export_mixed")`` (``quantize_`` and
``load_quantized`` do, after calling ``moe_export.runtime.register``). Nothing is registered at import.
"""

from __future__ import annotations

from moe_export.runtime.dispatch import EXPERT_FORMULATIONS, projections, select_experts
from moe_export.runtime.tensors import MixedWidthExpertsTensor, register_transformers_ops

IMPLEMENTATION = "moe_export_mixed"


def mixed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``hidden_states`` ``[T, H]``, ``top_k_index``/``top_k_weights`` ``[T, k]`` -> ``[T, H]``."""
    w_up = projections(self)[0]
    if not isinstance(w_up, MixedWidthExpertsTensor) or not isinstance(self.down_proj, MixedWidthExpertsTensor):
        # float (or partly float) experts: the plain gather + bmm path handles them
        from transformers.integrations.moe import batched_mm_experts_forward

        return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self.is_transposed:
        raise NotImplementedError(f"{type(self).__name__}: transposed expert layouts are not supported yet")
    formulation = EXPERT_FORMULATIONS[select_experts(self, hidden_states, top_k_index)]
    return formulation(self, hidden_states, top_k_index, top_k_weights)


_REGISTERED = False


def register() -> None:
    """Register ``moe_export_mixed`` in transformers' ``ALL_EXPERTS_FUNCTIONS`` and the subclasses' handling of
    transformers' own ops. Idempotent."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, mixed_experts_forward)
    register_transformers_ops()
    _REGISTERED = True
