"""Triton kernels for expert matmuls whose experts are stored at different bit widths.

Weights come in the width-group layout of docs/architecture.md: for each width b, ``packed_b`` uint8
``[E_b, N, K*b/8]`` (LSB-first bit stream along K), ``scale_b``/``zero_b`` float16 ``[E_b, N, K/g]``
(``zero_b`` absent for symmetric grids, which use ``symmetric_zero(b)``), plus ``expert_bits [E]`` and
``slot [E]`` (the expert's index inside its width group). Every kernel unpacks the bytes in registers,
applies ``w = (q - zero) * scale`` in float32 (the same ops as ``quant.base.dequantize``, so the
dequantized tile is bit-exact) and multiplies:

* ``gather_mm``  (decode): pair s = (token, routed expert) computes ``out[s] = x[s] @ W[expert_ids[s]].T``
  as a GEMV (multiply + reduce over K; too few rows for tensor cores).
* ``grouped_mm`` (prefill): rows of ``x`` are sorted by expert, ``offs[e]`` is the end row of expert e
  (as for ``torch._grouped_mm``); tiles of BLOCK_M rows of one expert go through ``tl.dot``.

One launch per width present (the width is a compile-time constant, so each unpack is specialised).
Grids are static upper bounds computed from shapes only: no host sync, CUDA-graph friendly. A program
whose pair/tile belongs to another width returns at once.

Import this module only after deciding on ``TRITON_INTERPRET``: Triton reads it when ``@triton.jit``
runs. ``moe_export.kernels.ops`` imports it lazily for that reason.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_export.runtime.layout import symmetric_zero

# ----------------------------------------------------------------------------------------------
# device functions
# ----------------------------------------------------------------------------------------------


@triton.jit
def _unpack(w_ptr, offs_n, k0, K, stride_wn, n_mask,
            BITS: tl.constexpr, BLOCK_K: tl.constexpr, TRANS: tl.constexpr, FAULT_BIT_SHIFT: tl.constexpr):
    """int32 codes of rows ``offs_n``, columns ``k0:k0+BLOCK_K``: ``[BLOCK_N, BLOCK_K]``, or
    ``[BLOCK_K, BLOCK_N]`` if TRANS (the B operand of a dot, without a register transpose).

    Mirrors runtime.layout.unpack: 8 values fill b bytes, so each octet is read as b byte planes
    (every byte loaded once), assembled into one little-endian word and cut by shifts of j*b. 8 bits
    take the same path: a plain byte tile spilled registers in the AOT check (kernels/aot.py), this does not.
    FAULT_BIT_SHIFT is a fault-injection hook, 0 everywhere except the test that plants an
    off-by-one to prove the bit-exact checks can fail.
    """
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    # 3 bits: 24-bit words; <= 4 bits fit int32; 5..8 bits need 64-bit words
    WORD: tl.constexpr = tl.int32 if BITS * 8 + FAULT_BIT_SHIFT <= 32 else tl.int64
    octet = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # [BK/8]
    shifts = (tl.arange(0, 8) * BITS + FAULT_BIT_SHIFT).to(WORD)  # [8]
    if TRANS:
        mask = (octet < K // 8)[:, None] & n_mask[None, :]  # [BK/8, BN]
        ptr = w_ptr + offs_n[None, :] * stride_wn + (octet * BITS)[:, None]  # first byte of each octet
        word = tl.zeros([BLOCK_K // 8, BLOCK_N], dtype=WORD)
    else:
        mask = n_mask[:, None] & (octet < K // 8)[None, :]  # [BN, BK/8]
        ptr = w_ptr + offs_n[:, None] * stride_wn + (octet * BITS)[None, :]
        word = tl.zeros([BLOCK_N, BLOCK_K // 8], dtype=WORD)
    for i in tl.static_range(BITS):
        word = word | (tl.load(ptr + i, mask=mask, other=0).to(WORD) << (8 * i))
    if TRANS:
        q = (word[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BK/8, 8, BN]
        q = tl.reshape(q, [BLOCK_K, BLOCK_N]).to(tl.int32)
    else:
        q = (word[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BN, BK/8, 8]
        q = tl.reshape(q, [BLOCK_N, BLOCK_K]).to(tl.int32)
    return q


@triton.jit
def _group_params(s_ptr, z_ptr, offs_n, k0, K, stride_sn, n_mask, G: tl.constexpr, HAS_ZERO: tl.constexpr,
                  SYM_ZERO: tl.constexpr, BLOCK_K: tl.constexpr, TRANS: tl.constexpr):
    """float32 scale and zero of the groups a K-block covers, NG = BLOCK_K // G groups (BLOCK_K % G == 0)
    or 1 (G % BLOCK_K == 0): ``[BN, NG]``, or ``[NG, BN]`` if TRANS."""
    NG: tl.constexpr = BLOCK_K // G if BLOCK_K % G == 0 else 1
    g_idx = k0 // G + tl.arange(0, NG)  # [NG]
    if TRANS:
        mask = (g_idx < K // G)[:, None] & n_mask[None, :]
        g_off = offs_n[None, :] * stride_sn + g_idx[:, None]  # [NG, BN]
    else:
        mask = n_mask[:, None] & (g_idx < K // G)[None, :]
        g_off = offs_n[:, None] * stride_sn + g_idx[None, :]  # [BN, NG]
    s = tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(z_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.full(s.shape, SYM_ZERO, tl.float32)
    return s, z


@triton.jit
def _dequant(w_ptr, s_ptr, z_ptr, offs_n, k0, K, stride_wn, stride_sn, n_mask,
             BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr,
             BLOCK_K: tl.constexpr, TRANS: tl.constexpr, FAULT_BIT_SHIFT: tl.constexpr):
    """float32 ``(q - zero) * scale``, ``[BN, BLOCK_K]`` (``[BLOCK_K, BN]`` if TRANS); the same float ops as
    quant.base.dequantize, so the tile is bit-exact."""
    BLOCK_N: tl.constexpr = offs_n.shape[0]
    q = _unpack(w_ptr, offs_n, k0, K, stride_wn, n_mask, BITS, BLOCK_K, TRANS, FAULT_BIT_SHIFT).to(tl.float32)
    if BLOCK_K % G == 0 or G % BLOCK_K == 0:
        # whole groups per block, or a block inside one group: one scale/zero load per group
        s, z = _group_params(s_ptr, z_ptr, offs_n, k0, K, stride_sn, n_mask, G, HAS_ZERO, SYM_ZERO, BLOCK_K, TRANS)
        if TRANS:
            NG: tl.constexpr = s.shape[0]
            q = tl.reshape(q, [NG, BLOCK_K // NG, BLOCK_N])
            w = tl.reshape((q - z[:, None, :]) * s[:, None, :], [BLOCK_K, BLOCK_N])
        else:
            NG: tl.constexpr = s.shape[1]
            q = tl.reshape(q, [BLOCK_N, NG, BLOCK_K // NG])
            w = tl.reshape((q - z[:, :, None]) * s[:, :, None], [BLOCK_N, BLOCK_K])
    else:
        # any other group size (a row group whose K is not a multiple of BLOCK_K): per-element gather
        offs_k = k0 + tl.arange(0, BLOCK_K)
        if TRANS:
            mask = (offs_k < K)[:, None] & n_mask[None, :]
            g_off = offs_n[None, :] * stride_sn + (offs_k // G)[:, None]
        else:
            mask = n_mask[:, None] & (offs_k < K)[None, :]
            g_off = offs_n[:, None] * stride_sn + (offs_k // G)[None, :]
        s = tl.load(s_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            w = (q - tl.load(z_ptr + g_off, mask=mask, other=0.0).to(tl.float32)) * s
        else:
            w = (q - SYM_ZERO) * s
    return w


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, R, K, stride_wr, stride_sr, stride_or,
                    BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr,
                    OUTPUT_Q: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, TRANS: tl.constexpr,
                    FAULT_BIT_SHIFT: tl.constexpr):
    """Rows [R, K*b/8] -> q (uint8, OUTPUT_Q) or w_hat (float32) [R, K]. TRANS builds the tile K-major
    (as the grouped kernel does) and stores it back row-major, so tests can check both orientations."""
    offs_r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)  # [BR]
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
    r_mask = offs_r < R
    if TRANS:
        mask = (offs_k < K)[:, None] & r_mask[None, :]  # [BK, BR]
        out = out_ptr + offs_r[None, :] * stride_or + offs_k[:, None]
    else:
        mask = r_mask[:, None] & (offs_k < K)[None, :]  # [BR, BK]
        out = out_ptr + offs_r[:, None] * stride_or + offs_k[None, :]
    if OUTPUT_Q:
        q = _unpack(w_ptr, offs_r, k0, K, stride_wr, r_mask, BITS, BLOCK_K, TRANS, FAULT_BIT_SHIFT)
        tl.store(out, q.to(tl.uint8), mask=mask)
    else:
        w = _dequant(w_ptr, s_ptr, z_ptr, offs_r, k0, K, stride_wr, stride_sr, r_mask,
                     BITS, G, HAS_ZERO, SYM_ZERO, BLOCK_K, TRANS, FAULT_BIT_SHIFT)
        tl.store(out, w, mask=mask)


@triton.jit
def _gather_mm_kernel(x_ptr, ids_ptr, ebits_ptr, slot_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
                      N, K, stride_xs, stride_os, stride_we, stride_wn, stride_se, stride_sn, S_BUCKET,
                      BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FAULT_BIT_SHIFT: tl.constexpr):
    # grid: (S pairs, cdiv(N, BLOCK_N)); S_BUCKET only keys the autotuner
    pid_s = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(ids_ptr + pid_s)
    if tl.load(ebits_ptr + e) != BITS:
        return  # the launch for this expert's width computes the pair
    slot = tl.load(slot_ptr + e).to(tl.int64)
    w_ptr += slot * stride_we
    s_ptr += slot * stride_se
    z_ptr += slot * stride_se
    x_ptr += pid_s.to(tl.int64) * stride_xs

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # [BK]
        if BLOCK_K % G == 0 or G % BLOCK_K == 0:
            # y[n] = sum_g s[n,g] * (sum_j q[n,g,j] x[g,j] - z[n,g] * sum_j x[g,j]): the inner loop is
            # int->float + FMA, scale and zero are applied once per group
            q = _unpack(w_ptr, offs_n, k0, K, stride_wn, n_mask, BITS, BLOCK_K, False, FAULT_BIT_SHIFT).to(tl.float32)
            s, z = _group_params(s_ptr, z_ptr, offs_n, k0, K, stride_sn, n_mask, G, HAS_ZERO, SYM_ZERO, BLOCK_K, False)
            NG: tl.constexpr = s.shape[1]
            xg = tl.reshape(x, [NG, BLOCK_K // NG])  # [NG, g]
            qx = tl.sum(tl.reshape(q, [BLOCK_N, NG, BLOCK_K // NG]) * xg[None, :, :], axis=2)  # [BN, NG]
            acc += tl.sum(s * (qx - z * tl.sum(xg, axis=1)[None, :]), axis=1)
        else:
            w = _dequant(w_ptr, s_ptr, z_ptr, offs_n, k0, K, stride_wn, stride_sn, n_mask,
                         BITS, G, HAS_ZERO, SYM_ZERO, BLOCK_K, False, FAULT_BIT_SHIFT)  # [BN, BK]
            acc += tl.sum(w * x[None, :], axis=1)
    out = out_ptr + pid_s.to(tl.int64) * stride_os + offs_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _grouped_mm_kernel(x_ptr, offs_ptr, ebits_ptr, slot_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
                       N, K, E, stride_xs, stride_os, stride_we, stride_wn, stride_se, stride_sn, S_BUCKET,
                       BITS: tl.constexpr, G: tl.constexpr, HAS_ZERO: tl.constexpr, SYM_ZERO: tl.constexpr,
                       E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, FAULT_BIT_SHIFT: tl.constexpr):
    # grid: (cdiv(S, BLOCK_M) + E, cdiv(N, BLOCK_N)), an upper bound on the row tiles of this width
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Tile -> expert map, recomputed per program from E counts (cheap next to the K loop, and no host sync):
    # experts of this width contribute cdiv(rows_e, BLOCK_M) tiles each, in expert order.
    e_idx = tl.arange(0, E_POW2)  # [Ep]
    e_ok = e_idx < E
    ends = tl.load(offs_ptr + e_idx, mask=e_ok, other=0).to(tl.int32)  # [Ep]
    starts = tl.load(offs_ptr + e_idx - 1, mask=e_ok & (e_idx > 0), other=0).to(tl.int32)
    mine = e_ok & (tl.load(ebits_ptr + e_idx, mask=e_ok, other=0) == BITS)
    tiles = tl.where(mine, tl.cdiv(ends - starts, BLOCK_M), 0)  # [Ep]
    cum = tl.cumsum(tiles, 0)  # [Ep] inclusive
    if pid_m >= tl.sum(tiles):
        return
    e = tl.sum((cum <= pid_m).to(tl.int32))  # first expert whose tiles reach past pid_m
    is_e = e_idx == e
    row0 = tl.sum(tl.where(is_e, starts, 0))
    row_end = tl.sum(tl.where(is_e, ends, 0))
    tile = pid_m - tl.sum(tl.where(is_e, cum - tiles, 0))
    slot = tl.load(slot_ptr + e).to(tl.int64)
    w_ptr += slot * stride_we
    s_ptr += slot * stride_se
    z_ptr += slot * stride_se

    offs_m = row0 + tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    m_mask = offs_m < row_end
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xs  # [BM, 1]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)  # [BK]
        x = tl.load(x_rows + offs_k[None, :], mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0)  # [BM, BK]
        w = _dequant(w_ptr, s_ptr, z_ptr, offs_n, k0, K, stride_wn, stride_sn, n_mask,
                     BITS, G, HAS_ZERO, SYM_ZERO, BLOCK_K, True, FAULT_BIT_SHIFT)  # [BK, BN]
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_os + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# autotune configurations
# ----------------------------------------------------------------------------------------------

def _cfg(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


# GEMV: the weight stream dominates; wide K blocks keep many bytes in flight per program.
# Hopper (sm90: 228 KB smem/SM, 3.35 TB/s HBM3) takes deeper pipelines than Ampere (sm80: 164 KB, 2 TB/s).
GATHER_CONFIGS = {
    "ampere": [
        _cfg(4, 2, BLOCK_N=32, BLOCK_K=128), _cfg(4, 3, BLOCK_N=32, BLOCK_K=256),
        _cfg(4, 2, BLOCK_N=64, BLOCK_K=128), _cfg(8, 3, BLOCK_N=64, BLOCK_K=256),
        _cfg(2, 3, BLOCK_N=16, BLOCK_K=256), _cfg(4, 2, BLOCK_N=128, BLOCK_K=64),
    ],
    "hopper": [
        _cfg(4, 3, BLOCK_N=32, BLOCK_K=256), _cfg(4, 4, BLOCK_N=32, BLOCK_K=512),
        _cfg(8, 3, BLOCK_N=64, BLOCK_K=256), _cfg(8, 4, BLOCK_N=64, BLOCK_K=512),
        _cfg(4, 4, BLOCK_N=16, BLOCK_K=512), _cfg(8, 3, BLOCK_N=128, BLOCK_K=128),
    ],
}

# Grouped GEMM: mma.sync tiles on Ampere, larger tiles and deeper pipelines on Hopper. Small BLOCK_M
# entries serve experts that receive few rows. float32 activations take an exact ("ieee") dot, which
# runs on FMA units with operands in registers: only small tiles fit without spilling (kernels/aot.py).
GROUPED_CONFIGS = {
    "ampere": [
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
        _cfg(4, 4, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32),
        _cfg(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=64), _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
    ],
    "hopper": [
        _cfg(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
        _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), _cfg(8, 4, BLOCK_M=64, BLOCK_N=256, BLOCK_K=64),
        _cfg(4, 5, BLOCK_M=32, BLOCK_N=128, BLOCK_K=128), _cfg(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128),
    ],
    "fp32": [
        _cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), _cfg(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        _cfg(4, 3, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
    ],
}

_TUNE_KEYS = ["N", "K", "S_BUCKET", "BITS", "G", "HAS_ZERO"]
_TUNED: dict[tuple[str, str], object] = {}


def arch_class(device: torch.device) -> str:
    """``"hopper"`` for sm90+, ``"ampere"`` for sm80/86/89 (and older, where the kernels may still run)."""
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"


def config_table(kind: str, device: torch.device, dtype: torch.dtype) -> str:
    """Which config list a launch autotunes over: the GPU class, or ``"fp32"`` for float32 grouped GEMMs."""
    if kind == "grouped" and dtype == torch.float32:
        return "fp32"
    return arch_class(device)


def _tuned(kind: str, table: str):
    if (kind, table) not in _TUNED:
        kernel, configs = {"gather": (_gather_mm_kernel, GATHER_CONFIGS), "grouped": (_grouped_mm_kernel, GROUPED_CONFIGS)}[kind]
        _TUNED[kind, table] = triton.autotune(configs=configs[table], key=_TUNE_KEYS)(kernel)
    return _TUNED[kind, table]


# ----------------------------------------------------------------------------------------------
# launchers (no validation here: moe_export.kernels.ops validates before calling)
# ----------------------------------------------------------------------------------------------


def _bucket(s: int) -> int:
    return min(triton.next_power_of_2(max(s, 1)), 4096)


def _group_args(bits: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, k: int) -> dict:
    return dict(
        BITS=bits, G=k // scale.shape[-1], HAS_ZERO=zero is not None, SYM_ZERO=symmetric_zero(bits),
    )


def unpack(packed: torch.Tensor, bits: int, k: int, *, block_r: int = 16, block_k: int = 64, trans: bool = False,
           fault_bit_shift: int = 0) -> torch.Tensor:
    """uint8 ``[..., K*b/8]`` -> uint8 ``[..., K]``; the Triton twin of ``runtime.layout.unpack``."""
    rows = packed.reshape(-1, packed.shape[-1])  # [R, Kb]
    out = torch.empty(rows.shape[0], k, dtype=torch.uint8, device=packed.device)
    grid = (triton.cdiv(rows.shape[0], block_r), triton.cdiv(k, block_k))
    _dequant_kernel[grid](rows, rows, rows, out, rows.shape[0], k, rows.stride(0), 0, out.stride(0),
                          BITS=bits, G=k, HAS_ZERO=False, SYM_ZERO=0.0, OUTPUT_Q=True,
                          BLOCK_R=block_r, BLOCK_K=block_k, TRANS=trans, FAULT_BIT_SHIFT=fault_bit_shift)
    return out.reshape(*packed.shape[:-1], k)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, k: int, *,
               block_r: int = 16, block_k: int = 64, trans: bool = False, fault_bit_shift: int = 0) -> torch.Tensor:
    """float32 ``[..., K]`` equal to ``quant.base.dequantize(unpack(packed), scale, zero)``."""
    rows = packed.reshape(-1, packed.shape[-1])  # [R, Kb]
    s = scale.reshape(-1, scale.shape[-1])  # [R, K/g]
    z = s if zero is None else zero.reshape(-1, zero.shape[-1])
    out = torch.empty(rows.shape[0], k, dtype=torch.float32, device=packed.device)
    grid = (triton.cdiv(rows.shape[0], block_r), triton.cdiv(k, block_k))
    _dequant_kernel[grid](rows, s, z, out, rows.shape[0], k, rows.stride(0), s.stride(0), out.stride(0),
                          **_group_args(bits, packed, scale, zero, k), OUTPUT_Q=False,
                          BLOCK_R=block_r, BLOCK_K=block_k, TRANS=trans, FAULT_BIT_SHIFT=fault_bit_shift)
    return out.reshape(*packed.shape[:-1], k)


def gather_mm(x, expert_ids, packed, scales, zeros, bits, expert_bits, slot, *,
              config: dict | None = None, fault_bit_shift: int = 0) -> torch.Tensor:
    """``out[s] = x[s] @ W[expert_ids[s]].T``; x ``[S, K]``, expert_ids ``[S]`` -> ``[S, N]`` (x.dtype).

    ``config=None`` autotunes (CUDA); a dict such as ``{"BLOCK_N": 16, "BLOCK_K": 32}`` pins the tile
    (the interpreter tests use this).
    """
    s_rows, k = x.shape
    n = packed[0].shape[1]
    out = torch.empty(s_rows, n, dtype=x.dtype, device=x.device)
    if s_rows == 0:
        return out
    for b, p, sc, z in zip(bits, packed, scales, zeros):
        args = (x, expert_ids, expert_bits, slot, p, sc, sc if z is None else z, out,
                n, k, x.stride(0), out.stride(0), p.stride(0), p.stride(1), sc.stride(0), sc.stride(1), _bucket(s_rows))
        meta = _group_args(b, p, sc, z, k)
        if config is None:
            kernel = _tuned("gather", config_table("gather", x.device, x.dtype))
            grid = lambda m: (s_rows, triton.cdiv(n, m["BLOCK_N"]))  # noqa: E731
            kernel[grid](*args, **meta, FAULT_BIT_SHIFT=fault_bit_shift)
        else:
            grid = (s_rows, triton.cdiv(n, config["BLOCK_N"]))
            _gather_mm_kernel[grid](*args, **meta, **config, FAULT_BIT_SHIFT=fault_bit_shift)
    return out


def grouped_mm(x, offs, packed, scales, zeros, bits, expert_bits, slot, *,
               config: dict | None = None, fault_bit_shift: int = 0) -> torch.Tensor:
    """Rows of x ``[S, K]`` sorted by expert, ``offs [E]`` cumulative end rows -> ``[S, N]`` (x.dtype).

    Rows past ``offs[-1]`` are zero (torch._grouped_mm leaves them undefined).
    """
    s_rows, k = x.shape
    n = packed[0].shape[1]
    e = expert_bits.shape[0]
    out = torch.zeros(s_rows, n, dtype=x.dtype, device=x.device)
    if s_rows == 0:
        return out
    precision = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit inputs
    for b, p, sc, z in zip(bits, packed, scales, zeros):
        args = (x, offs, expert_bits, slot, p, sc, sc if z is None else z, out,
                n, k, e, x.stride(0), out.stride(0), p.stride(0), p.stride(1), sc.stride(0), sc.stride(1),
                _bucket(s_rows))
        meta = dict(_group_args(b, p, sc, z, k), E_POW2=triton.next_power_of_2(e), DOT_PRECISION=precision)
        if config is None:
            kernel = _tuned("grouped", config_table("grouped", x.device, x.dtype))
            grid = lambda m: (triton.cdiv(s_rows, m["BLOCK_M"]) + e, triton.cdiv(n, m["BLOCK_N"]))  # noqa: E731
            kernel[grid](*args, **meta, FAULT_BIT_SHIFT=fault_bit_shift)
        else:
            grid = (triton.cdiv(s_rows, config["BLOCK_M"]) + e, triton.cdiv(n, config["BLOCK_N"]))
            _grouped_mm_kernel[grid](*args, **meta, **config, FAULT_BIT_SHIFT=fault_bit_shift)
    return out
