"""Router-norm change score (paper eq. for Lambda_s), one value per expert of one MoE layer.

    L_s = ||w_s^(T)||_2 - ||w_s^(0)||_2        w_s = row s of the router weight [E, H]

T is the final checkpoint, 0 the one before this training stage (the pre-trained model when
fine-tuning). Signed: no absolute value. Without a reference the final norm ||w_s^(T)|| is the
proxy (the official Mixtral code: a small zero-mean init gives every expert about the same
||w_s^(0)||). Smaller L_s ranks higher and gets more bits.
"""

from __future__ import annotations

import torch


def router_row_norms(W: torch.Tensor) -> torch.Tensor:
    """``W`` router weight ``[E, H]`` -> ``[E]`` float64 l2 norm of each row."""
    return torch.linalg.vector_norm(W.detach().to(torch.float64), ord=2, dim=1)


def router_norm_change(W_final: torch.Tensor, W_ref: torch.Tensor | None = None, absolute: bool = False) -> torch.Tensor:
    """``L_s`` for every expert s -> ``[E]`` float64.

    ``W_ref`` None: the final-norm proxy. ``absolute``: ``|L_s|`` (an option for Switch-style
    fine-tunes where a router row may shrink; the paper's score is signed).
    """
    L = router_row_norms(W_final)  # [E]
    if W_ref is not None:
        if tuple(W_ref.shape) != tuple(W_final.shape):
            raise ValueError(
                f"reference router has shape {tuple(W_ref.shape)} but the final one {tuple(W_final.shape)}; "
                "the reference must be the same architecture (e.g. the pre-trained checkpoint)"
            )
        L = L - router_row_norms(W_ref)
    return L.abs() if absolute else L


def ascending_order(score: torch.Tensor) -> list[int]:
    """Experts by ascending score; index 0 = highest priority. Ties keep expert order (stable)."""
    return [int(i) for i in torch.sort(score.to(torch.float64), stable=True).indices]
