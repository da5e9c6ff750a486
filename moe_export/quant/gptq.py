"""GPTQ (Frantar et al., 2022): quantize W column by column, spreading each column's error over the
columns not yet quantized through the inverse Hessian of the layer inputs. Compare with rtn.py.

    H = 2/n X^T X + damp I               (X: the n calibration inputs of this weight, [n, K])
    Hinv = chol(H^-1)^T                   (upper Cholesky factor of the inverse)
    for each column i:  Q[:, i] = quant(W[:, i]);  Err = (W[:, i] - Q[:, i]) / Hinv[i, i]
                        W[:, i:] -= Err Hinv[i, i:]

Lazy batch updates in blocks of 128 columns; group-wise params (float16) are chosen from the
already-updated columns when a group starts, by the paper's search (the min/max range scaled by
p in [0.9, 1.1], min sum |err|^2.4, float zero-point; ``search=False``: rtn.py's min/max grid). Dampening starts at percdamp * mean(diag H)
and grows until the Cholesky succeeds. Inputs that never fire (diag H = 0) are quantized
round-to-nearest without spreading error. The paper's MC-MoE quirk (no in-block error feedback at
<= 3 bits) is not reproduced: on the synthetic layers of tests/test_quant_gptq.py it raised the
output error by 1.2-1.8x at 1-3 bits.
"""

from __future__ import annotations

import torch

from moe_export.quant.base import (
    QuantizedWeight, Quantizer, register_quantizer, resolve_group_size, zero_table,
)
from moe_export.quant.rtn import minmax_params


class CholeskyError(RuntimeError):
    pass


_SHRINK = torch.cat([torch.ones(1), torch.linspace(0.9, 1.0, 51)[:-1], torch.linspace(1.0, 1.1, 51)[1:]])  # [101]


def search_params(w: torch.Tensor, bits: int, symmetric: bool, norm: float = 2.4):
    """Paper's grid (MC-MoE lineage): scale the min/max range by p in [0.9, 1.1], keep the p minimising
    sum |w - w_hat|^2.4 per row, zero-point not rounded. ``w`` ``[N, g]`` -> float16 (scale, zero) ``[N, 1]``."""
    if bits == 1:
        return minmax_params(w, bits, None, symmetric)
    qmax = 2**bits - 1
    w = w.float()
    if symmetric:
        base = w.abs().amax(-1) / (qmax / 2)  # [N]
        zero = zero_table(None, base, bits)
    else:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        base = (hi - lo) / qmax
        zero = -lo / base.clamp_min(2.0**-24)  # p scales lo and hi alike: the zero-point does not move
    zero16 = zero.to(torch.float16)
    scale = (_SHRINK[:, None] * base[None]).clamp_min(2.0**-24).to(torch.float16).float()  # [C, N]
    z = zero16.float()[None, :, None]
    q = torch.round(w[None] / scale[..., None] + z).clamp(0, qmax)  # [C, N, g]
    err = ((q - z) * scale[..., None] - w[None]).abs().pow(norm).sum(-1)  # [C, N]
    best = scale.gather(0, err.argmin(0, keepdim=True))[0]  # [N]
    return best.to(torch.float16)[:, None], (None if symmetric else zero16[:, None])


def damped_inverse_cholesky(H: torch.Tensor, percdamp: float, max_tries: int = 12) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, raising ``damp`` x10 until ``H + damp I`` factors."""
    diag = torch.diagonal(H)
    mean_diag = float(diag.mean()) if float(diag.mean()) > 0 else 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + percdamp * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U, percdamp
        percdamp *= 10
    raise CholeskyError(f"GPTQ: Hessian [{H.shape[0]}x{H.shape[0]}] not positive definite even with percdamp={percdamp}")


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    blocksize: int = 128,
    percdamp: float = 0.01,
    search: bool = False,
) -> tuple[QuantizedWeight, float]:
    """``W`` ``[N, K]``, ``H`` ``[K, K]``. Returns the quantized weight and the percdamp that was used."""
    N, K = W.shape
    g = resolve_group_size(group_size, K)
    # Groups must start where W is fully updated: at a block start, or inside a block that holds them.
    B = (blocksize // g) * g if g <= blocksize else (blocksize if g % blocksize == 0 else g)
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0  # no signal: decouple those columns (their error goes nowhere)
    Hinv, damp_used = damped_inverse_cholesky(H, percdamp)

    qmax = 2**bits - 1
    scale = torch.empty(N, K // g, dtype=torch.float16)
    zero = None if symmetric else torch.empty(N, K // g, dtype=torch.float16)
    Q_int = torch.empty(N, K, dtype=torch.uint8)
    s = z = None
    for i1 in range(0, K, B):
        i2 = min(i1 + B, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                cur = W1[:, i : i + g] if i + g <= i2 - i1 else torch.cat([W1[:, i:], W[:, i2 : col + g]], 1)
                sg, zg = search_params(cur, bits, symmetric) if search else minmax_params(cur, bits, g, symmetric)
                scale[:, col // g] = sg[:, 0]
                if zero is not None:
                    zero[:, col // g] = zg[:, 0]
                s = sg[:, 0].float()
                z = zero_table(None if zg is None else zg[:, 0], s, bits).float()
            w = W1[:, i]
            d = Hinv1[i, i]
            q = torch.round(w / s + z).clamp(0, qmax)
            Q_int[:, col] = q.to(torch.uint8)
            err = (w - (q - z) * s) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return QuantizedWeight(Q_int, scale, zero, bits, group_size), damp_used


@register_quantizer
class GPTQQuantizer(Quantizer):
    name = "gptq"
    needs_calibration = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01, search: bool = True):
        if blocksize < 1:
            raise ValueError(f"gptq blocksize must be >= 1, got {blocksize}")
        if not percdamp > 0:
            raise ValueError(f"gptq percdamp must be > 0, got {percdamp}")
        self.blocksize = blocksize
        self.percdamp = percdamp
        self.search = search  # the paper's p in [0.9, 1.1] range search per group (False: plain min/max)
        self.last_percdamp: float | None = None  # what the last call needed (logged by calibration.py)

    def quantize(self, weight, bits, group_size, symmetric, hessian=None) -> QuantizedWeight:
        if hessian is None:
            raise ValueError(
                "gptq needs the input Hessian of each weight: run it through "
                "moe_export.quant.calibration.quantize_sequential (or pass hessian=[K, K])"
            )
        K = weight.shape[-1]
        if weight.dim() != 2 or tuple(hessian.shape) != (K, K):
            raise ValueError(f"gptq: weight must be [N, K] and hessian [K, K]; got {tuple(weight.shape)} and {tuple(hessian.shape)}")
        if not 1 <= bits <= 8:
            raise ValueError(f"gptq supports 1-8 bits, got {bits}")
        qw, self.last_percdamp = gptq_quantize(
            weight, hessian, bits, group_size, symmetric, self.blocksize, self.percdamp, self.search
        )
        return qw
