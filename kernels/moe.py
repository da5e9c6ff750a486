"""The CUDA path of the ``moe_export_mixed`` experts implementation, on the mixed-width custom ops.

``moe_export.experts.mixed_experts_forward`` sends CUDA tensors here. Same contract as transformers'
experts functions: ``hidden_states [T, H]``, ``top_k_index``/``top_k_weights [T, k]`` -> ``[T, H]``.

* few pairs (decode): ``mixed_width_gather_mm`` per (token, expert) pair, no sort;
* many pairs (prefill): sort pairs by expert, ``mixed_width_grouped_mm`` over the expert-contiguous rows.

The choice depends on shapes only, so ``torch.compile`` guards on it instead of breaking the graph.
"""

from __future__ import annotations

import importlib.util

import torch

from moe_export.kernels import ops  # noqa: F401  (registers torch.ops.moe_export.*)

if importlib.util.find_spec("triton") is None:
    # moe_export.experts imports this for CUDA tensors and falls back to its plain-torch path on ImportError
    raise ImportError("moe_export.kernels.moe needs triton for its CUDA kernels: pip install 'triton==3.9.0'")

# Pairs (tokens * top_k) up to which one GEMV per pair beats sorting into grouped-GEMM tiles: below
# 16 rows a tensor-core tile is mostly padding.
DECODE_MAX_PAIRS = 16


def width_group_args(w) -> tuple:
    """``(packed, scales, zeros, bits, expert_bits, slot)`` of a ``MixedWidthExpertsTensor``, the ops' arguments."""
    groups = list(w.groups())  # [(b, packed_b, scale_b, zero_b)], ascending b
    return ([g[1] for g in groups], [g[2] for g in groups], [g[3] for g in groups], [g[0] for g in groups],
            w.expert_bits, w.slot)


def gather_mm(x, expert_ids, w) -> torch.Tensor:
    """``out[s] = x[s] @ W[expert_ids[s]].T`` for a mixed-width stack ``w``: ``[S, K]`` -> ``[S, N]``."""
    return torch.ops.moe_export.mixed_width_gather_mm(x, expert_ids, *width_group_args(w))


def grouped_mm(x, offs, w) -> torch.Tensor:
    """Rows of ``x`` sorted by expert, ``offs [E]`` cumulative end rows: ``[S, K]`` -> ``[S, N]``."""
    return torch.ops.moe_export.mixed_width_grouped_mm(x, offs, *width_group_args(w))


def _projections(self):
    if self.has_gate:
        return self.gate_up_proj, (self.gate_up_proj_bias if self.has_bias else None)
    return self.up_proj, (self.up_proj_bias if self.has_bias else None)


def _gate(self, h):
    return self._apply_gate(h) if self.has_gate else self.act_fn(h)


def mixed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``self`` is a transformers experts module whose ``gate_up_proj``/``up_proj`` and ``down_proj`` are
    ``MixedWidthExpertsTensor`` (not transposed)."""
    t, k = top_k_index.shape
    w_up, b_up = _projections(self)
    b_down = self.down_proj_bias if self.has_bias else None
    ids = top_k_index.reshape(-1)  # [S]
    weights = top_k_weights.reshape(-1, 1)  # [S, 1]
    if ids.numel() <= DECODE_MAX_PAIRS:
        x = hidden_states.repeat_interleave(k, dim=0)  # [S, H]
        h = gather_mm(x, ids, w_up)  # [S, 2I]
        if b_up is not None:
            h = h + b_up[ids]
        y = gather_mm(_gate(self, h), ids, self.down_proj)  # [S, H]
        if b_down is not None:
            y = y + b_down[ids]
        y = y * weights.to(y.dtype)
    else:
        ids_sorted, perm = torch.sort(ids)  # [S]
        x = hidden_states[perm // k]  # [S, H], expert-contiguous
        # histc, not bincount: bincount syncs with the host to size its output
        hist_in = ids_sorted.int() if ids.is_cuda else ids_sorted.float()
        counts = torch.histc(hist_in, bins=w_up.num_experts, min=0, max=w_up.num_experts - 1)
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]
        h = grouped_mm(x, offs, w_up)  # [S, 2I]
        if b_up is not None:
            h = h + b_up[ids_sorted]
        y_sorted = grouped_mm(_gate(self, h), offs, self.down_proj)  # [S, H]
        if b_down is not None:
            y_sorted = y_sorted + b_down[ids_sorted]
        y_sorted = y_sorted * weights[perm].to(y_sorted.dtype)
        y = torch.empty_like(y_sorted).index_copy_(0, perm, y_sorted)  # back to (token, k) order
    # reshape + sum accumulates each token's experts deterministically (index_add_ would use atomics)
    return y.view(t, k, -1).sum(1).to(hidden_states.dtype)  # [T, H]
