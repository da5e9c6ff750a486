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
# Rows per chunk: a 256 x 4096 float32 block (4 MiB) stays in cache and the allocator reuses it, which
# made the pass over a [14336, 4096] bf16 expert ~10x faster than one whole-tensor float copy.
_CHUNK = 256
_BLOCK = 64  # candidate rows scored exactly at a time


def row_sq_norms(W1: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
    """``||W1[r]||^2`` for every row -> ``[I]`` float32: one conversion pass and one reduction pass."""
    buf = torch.empty(min(chunk, W1.shape[0]), W1.shape[1], dtype=torch.float32)
    out = []
    for start in range(0, W1.shape[0], chunk):
        src = W1[start : start + chunk]
        out.append(torch.linalg.vector_norm(buf[: src.shape[0]].copy_(src), dim=1).square_())
    return torch.cat(out)


def exact_row_var(rows: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of each row of ``rows`` ``[n, H]``, two-pass in float64 -> ``[n]``."""
    r = rows.to(torch.float64)
    return torch.var(r, dim=1)


def maxvar(W1: torch.Tensor, variant: str = "paper") -> float:
    """MaxVar of one expert from its first-layer weight ``W1`` ``[I, H]``.

    Exact, but reads the weight once: ``Var(w_r) <= ||w_r||^2 / (H - 1)``, so after one pass for
    the row norms only rows whose bound beats the best exact variance found so far are scored
    (a few blocks for near-zero-mean weights; every row in the worst case).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown MaxVar variant {variant!r}; choose one of {VARIANTS}")
    H = W1.shape[1]
    q = row_sq_norms(W1)  # [I]
    if not bool(torch.isfinite(q).all()):
        return float("nan")  # NaN/Inf weights (the pruning below would skip them): make_plan names the expert
    if variant == "largest-norm-row":
        r = int(torch.argmax(q))
        return float(exact_row_var(W1[r : r + 1])[0])
    order = torch.argsort(q, descending=True)  # [I]
    bound = q[order].double() / (H - 1)  # [I] upper bounds of the row variances, descending
    best = float("-inf")
    for start in range(0, len(order), _BLOCK):
        if bound[start] * (1 + 1e-4) < best:  # margin covers float32 rounding of the norms
            break
        best = max(best, float(exact_row_var(W1[order[start : start + _BLOCK]]).max()))
    return best


def layer_maxvar(first_weights, variant: str = "paper") -> torch.Tensor:
    """``first_weights``: each expert's ``[I, H]`` (tensors or zero-arg loaders) -> ``[E]`` float64.

    Loader e + 1 runs in a background thread while expert e is scored, so reading from disk and
    computing overlap (both release the GIL). Loaders may reuse at most two buffers.
    """
    from concurrent.futures import ThreadPoolExecutor

    items = list(first_weights)
    load = lambda i: items[i]() if callable(items[i]) else items[i]
    vals = []
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load, 0) if items else None
        for i in range(len(items)):
            w = nxt.result()
            nxt = pool.submit(load, i + 1) if i + 1 < len(items) else None
            vals.append(maxvar(w, variant))
    return torch.tensor(vals, dtype=torch.float64)
