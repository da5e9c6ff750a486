"""The int8-activation arithmetic of the CPU kernel core (moe_export/kernels/core/mixed_width.h, ``accuracy="int8"``).

Every vector path this CPU has (``avx512-vnni``, ``avx-vnni``, ``avx2``; ``scalar`` always) is checked bit for bit
against :func:`int8_reference`, a numpy model of the same integer arithmetic in the same float order:
activations quantized per block of the group size (``q = rint(x * 127/amax)``, scale ``amax/127``); per group,
exact integer products summed into 16 lanes (code ``c`` of the group to lane ``(c mod 64) // 4``, vpdpbusd's
dword quads), ``d = s_w * s_x``, ``acc_l = fma(d, lane_l, acc_l)`` for every lane, the zero term apart
(``zacc[group % 16] = fma(d, z * sum(q_x), ...)``), then ``fold(acc) - fold(zacc)``, each folded in halves. The AVX-VNNI
(VEX) path compiles in every build but runs only where the CPU has AVX-VNNI (not on AVX-512-only CPUs).

Against the exact (fp32) path the int8 arithmetic costs the activation rounding: SQNR of ``packed_linear`` with
Gaussian weights (RTN, group 32) and Gaussian activations, measured here 42-47 dB for every width 1..8
(int8's ~6 dB/bit x 8 bits less the block's peak-to-rms ratio); the bound asserted is 38 dB.
"""

import numpy as np
import pytest
import torch

from moe_export.kernels import cpu_ops
from moe_export.quant.rtn import RTNQuantizer
from moe_export.runtime.layout import pack, symmetric_zero, unpack_bits

PATHS = ("scalar", "avx2", "avx-vnni", "avx512-vnni")
SQNR_MIN_DB = 38.0
INT8 = cpu_ops.ACCURACIES["int8"]


@pytest.fixture(scope="module")
def ext():
    return cpu_ops.load(True)  # defines the dispatcher ops


def LIN(*args):
    return torch.ops.moe_export.cpu_packed_linear(*args)


def _available(ext):
    return [p for p in PATHS if cpu_ops.path_available(p)]


def fma32(a, b, c):
    """float32 ``fma(a, b, c)`` correctly rounded: the float64 sum of the exact product, corrected where
    rounding it again to float32 would hit a tie that the exact value does not (double rounding)."""
    a, b, c = (np.asarray(v, np.float32) for v in (a, b, c))
    p = a.astype(np.float64) * b.astype(np.float64)  # exact: 24 + 24 bits
    c64 = c.astype(np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)  # s + err == p + c exactly (TwoSum)
    r = s.astype(np.float32)
    towards = np.where(s > r.astype(np.float64), np.float32(np.inf), np.float32(-np.inf))
    other = np.nextafter(r, towards)
    tie = (s == (r.astype(np.float64) + other.astype(np.float64)) / 2) & (err != 0)
    fixed = np.where(err > 0, np.maximum(r, other), np.minimum(r, other))
    return np.where(tie, fixed, r).astype(np.float32)


def quantize_activations(x, group):
    """``[M, K]`` float32 -> int8 codes ``[M, G, g]`` (int64), block scales and code sums ``[M, G]`` float32."""
    m, k = x.shape
    xb = x.reshape(m, k // group, group)
    amax = np.abs(xb).max(-1)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, np.float32(1)), np.float32(0))
    xq = np.rint(xb * inv.astype(np.float32)[..., None]).astype(np.int64)
    return xq, (amax / np.float32(127)).astype(np.float32), xq.sum(-1).astype(np.float32)


def int8_reference(x, packed, scale, zero, bits, group, lanes=16):
    """``y [M, N]`` of the int8 arithmetic (module docstring). ``lanes`` other than 16 is a planted fault."""
    x = x.float().numpy()
    m, k = x.shape
    n, n_groups = scale.shape
    q = unpack_bits(packed, bits, k).numpy().astype(np.int64).reshape(n, n_groups, group)  # [N, G, g]
    xq, sx, qsum = quantize_activations(x, group)
    lane = np.eye(lanes, dtype=np.int64)[(np.arange(group) % 64) // 4 % lanes]  # [g, lanes]: code -> its lane
    p = np.einsum("ngk,mgk,kl->mngl", q, xq, lane).astype(np.float32)  # exact integers, then float32 [M, N, G, L]
    sw = scale.float().numpy()
    z = zero.float().numpy() if zero is not None else np.full_like(sw, symmetric_zero(bits))
    d = (sw[None] * sx[:, None, :]).astype(np.float32)  # [M, N, G]
    zq = (z[None] * qsum[:, None, :]).astype(np.float32)  # [M, N, G]
    acc = np.zeros((m, n, lanes), np.float32)
    zacc = np.zeros((m, n, lanes), np.float32)
    for gi in range(n_groups):
        acc = fma32(d[..., gi, None], p[..., gi, :], acc)
        zacc[..., gi % lanes] = fma32(d[..., gi], zq[..., gi], zacc[..., gi % lanes])

    def fold(a):
        h = lanes // 2
        while h >= 1:
            a = a[..., :h] + a[..., h:2 * h]
            h //= 2
        return a[..., 0]

    return torch.from_numpy((fold(acc) - fold(zacc)).copy())


def _weight(bits, n, k, group, sym, seed):
    torch.manual_seed(seed)
    q = RTNQuantizer().quantize(torch.randn(n, k), bits, group, sym)
    return pack(q.qdata, bits), q.scale, q.zero


def _run(path, x, p, s, z, bits, accuracy):
    with cpu_ops.forced_path(path):
        return LIN(x, p, s, z, bits, accuracy)


@pytest.mark.parametrize("bits", range(1, 9))
def test_int8_every_path_is_bit_exact_with_the_reference(ext, bits):
    paths = _available(ext)
    assert "scalar" in paths
    cases = [(256, 32), (256, 64), (256, 128), (256, None), (224, 32), (192, 48), (96, 24)]
    for k, group in cases:
        for sym in (True, False):
            g = group or k
            # 40 rows: decode (one activation row) folds rows 16 at a time, and 40 leaves a partial block
            p, s, z = _weight(bits, 40, k, g, sym, seed=bits * 100 + g)
            torch.manual_seed(g)
            x = torch.randn(3, k)
            x[1, :g] = 0  # an all-zero block: scale 0, codes 0
            ref = int8_reference(x, p, s, z, bits, g)
            for path in paths:
                for rows in (slice(0, 3), slice(1, 2), slice(2, 3)):  # prefill and decode
                    out = _run(path, x[rows], p, s, z, bits, INT8)
                    assert torch.equal(out, ref[rows]), (f"{path} b={bits} K={k} g={g} sym={sym} rows={rows}: max "
                                                         f"diff {(out - ref[rows]).abs().max().item():.3g}")


def test_int8_sqnr_against_exact_per_width(ext):
    """Int8 vs the exact fp32 path on the same packed weights, every width: at least SQNR_MIN_DB."""
    k, g = 1024, 32
    torch.manual_seed(0)
    x = torch.randn(4, k)
    worst = {}
    for bits in range(1, 9):
        for sym in (True, False):
            p, s, z = _weight(bits, 64, k, g, sym, seed=bits)
            exact = LIN(x, p, s, z, bits, cpu_ops.ACCURACIES["exact"]).double()
            approx = LIN(x, p, s, z, bits, INT8).double()
            sqnr = 10 * torch.log10(exact.pow(2).sum() / (approx - exact).pow(2).sum()).item()
            worst[bits] = min(worst.get(bits, 1e9), sqnr)
    print("int8 vs exact SQNR (dB) per width:", {b: round(v, 1) for b, v in worst.items()})
    assert min(worst.values()) >= SQNR_MIN_DB, worst


def test_planted_faults_are_caught(ext):
    """A one-bit shift of the codes, and the reference summed in another order, both break bit-exactness."""
    p, s, z = _weight(3, 16, 512, 32, False, seed=7)
    x = torch.randn(2, 512)
    out = LIN(x, p, s, z, 3, INT8)
    assert torch.equal(out, int8_reference(x, p, s, z, 3, 32))
    rows = p.to(torch.int64)
    carry = torch.cat([rows[:, 1:] & 1, torch.zeros_like(rows[:, :1])], 1)
    shifted = ((rows >> 1) | (carry << 7)).to(torch.uint8)
    assert not torch.equal(LIN(x, shifted, s, z, 3, INT8), out)
    assert not torch.equal(int8_reference(x, p, s, z, 3, 32, lanes=8), out)  # same values, another float order


def test_fused_ffn_int8_agrees_across_paths_and_with_exact(ext):
    """cpu_moe_ffn with int8 activations: the same bits on every path, close to the exact FFN."""
    from tests.test_kernels_cpu import _ffn_args, _ffn_layer

    widths = [2, 3, 6, 2, 8]
    up, down = _ffn_layer(widths, 128, 96, 32, True)
    torch.manual_seed(3)
    for t in (1, 2, 5):
        x = torch.randn(t, 128)
        ids = torch.stack([torch.randperm(len(widths))[:2] for _ in range(t)])  # [T, 2]
        wts = torch.rand(t, 2)
        args = _ffn_args(x, ids, wts, up, down)
        exact = torch.ops.moe_export.cpu_moe_ffn(*args, cpu_ops.ACCURACIES["exact"])
        outs = []
        for path in _available(ext):
            with cpu_ops.forced_path(path):
                outs.append(torch.ops.moe_export.cpu_moe_ffn(*args, INT8))
        assert all(torch.equal(o, outs[0]) for o in outs[1:])
        sqnr = 10 * torch.log10(exact.pow(2).sum() / (outs[0] - exact).pow(2).sum()).item()
        assert sqnr >= SQNR_MIN_DB - 6, f"T={t}: fused int8 vs exact SQNR {sqnr:.1f} dB"


def test_forcing_a_path_the_cpu_lacks_is_an_error(ext):
    missing = [p for p in PATHS if not cpu_ops.path_available(p)]
    for p in missing:
        with pytest.raises(RuntimeError, match="lacks"):
            with cpu_ops.forced_path(p):
                pass
    with pytest.raises(RuntimeError, match="must be one of"):
        with cpu_ops.forced_path("sse9"):
            pass


def test_kernels_split_output_rows_across_intra_op_threads(ext):
    """At 2 intra-op threads the ops' row loop runs on 2 threads (a build without OpenMP ran it on the caller
    alone: no speed from a second thread), and the results are the same bits as at 1 thread: the split is by
    output rows, each row summed whole by one thread."""
    from tests.test_kernels_cpu import _ffn_args, _ffn_layer

    widths = [2, 3, 6, 2, 8]
    up, down = _ffn_layer(widths, 128, 96, 32, True)
    torch.manual_seed(5)
    x = torch.randn(3, 128)
    args = _ffn_args(x, torch.stack([torch.randperm(len(widths))[:2] for _ in range(3)]), torch.rand(3, 2), up, down)
    p, s, z = _weight(4, 640, 256, 32, False, seed=11)
    xl = torch.randn(2, 256)
    before = torch.get_num_threads()
    outs = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert ext.parallel_threads(64) == n
            outs[n] = [torch.ops.moe_export.cpu_moe_ffn(*args, acc) for acc in (INT8, cpu_ops.ACCURACIES["exact"])]
            outs[n] += [LIN(xl, p, s, z, 4, acc) for acc in (INT8, cpu_ops.ACCURACIES["exact"])]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[2]))
