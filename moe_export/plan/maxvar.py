"""MaxVar: maximum intra-neuron weight variance of one expert (paper sec. 3).

    MaxVar_s = max_r Var_i(W1[r, i])          W1 = first-layer weight [I, H], rows r are neurons

W1 is the gate part of ``gate_up_proj`` (Mixtral ``w1``) or Switch ``wi``. A MaxVar ratio above
zeta = 3 means a wider weight range than any same-width bounded distribution explains, so a larger
quantization step at equal bits. ``variant="largest-norm-row"`` is the official Mixtral code's
score: the variance of the row with the largest l2 norm. Variances are unbiased (/(H-1)) as in the
official code; only ratios matter.
"""

from __future__ import annotations

import torch

VARIANTS = ("paper", "largest-norm-row")
# Rows per chunk: bounds the float32 copy (4096 x 4096 x 4 bytes = 64 MiB) for [14336, 4096] experts.
_CHUNK = 4096


def row_stats(W1: torch.Tensor, chunk: int = _CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row unbiased variance and squared l2 norm of ``W1`` ``[I, H]`` -> two ``[I]`` float32."""
    var, sq = [], []
    for start in range(0, W1.shape[0], chunk):
        w = W1[start : start + chunk].to(torch.float32)  # [c, H]
        var.append(torch.var(w, dim=1))
        sq.append(torch.linalg.vector_norm(w, dim=1).square())
    return torch.cat(var), torch.cat(sq)


def maxvar(W1: torch.Tensor, variant: str = "paper") -> float:
    """MaxVar of one expert from its first-layer weight ``W1`` ``[I, H]``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown MaxVar variant {variant!r}; choose one of {VARIANTS}")
    var, sq = row_stats(W1)  # [I], [I]
    if variant == "paper":
        return float(var.max())
    return float(var[torch.argmax(sq)])


def layer_maxvar(first_weights, variant: str = "paper") -> torch.Tensor:
    """``first_weights``: iterable of each expert's ``[I, H]`` (tensors or zero-arg loaders) -> ``[E]`` float64."""
    vals = [maxvar(w() if callable(w) else w, variant) for w in first_weights]
    return torch.tensor(vals, dtype=torch.float64)
