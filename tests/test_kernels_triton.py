"""Triton kernels under TRITON_INTERPRET=1 on CPU tensors, against the plain-torch reference.

Method: quantize random weights with RTN, pack them into the width-group layout, run the Triton kernels
in the interpreter at tiny shapes and compare with ``moe_export.kernels.reference`` (unpack via
``runtime.layout.unpack``, dequantize via ``runtime.layout.dequantize``, float32 matmul):

* unpack and dequantize: bit-exact (``torch.equal``), every width 1..8, group sizes 32/64/128/row;
* gather (decode) and grouped (prefill) matmuls: max abs error <= 1e-5 * (1 + max|ref|) in float32,
  for every width, every group size, and a layer mixing all five widths with symmetric and
  asymmetric groups. Measured worst case over the per-width tests: 3.8e-7 (the only difference is
  summation order, and the decode GEMV's group-factored form);
* a planted off-by-one (bit offset + 1, injected through the kernels' FAULT_BIT_SHIFT argument) is
  caught by every one of these checks.

Triton decides interpreter-or-GPU when it is imported and when ``@triton.jit`` runs: tests/conftest.py
sets TRITON_INTERPRET=1 on machines without CUDA before anything imports triton. On a CUDA machine the
same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]' installs it")

from moe_export.kernels import reference  # noqa: E402
from moe_export.runtime.layout import pack, unpack  # noqa: E402
from moe_export.quant.rtn import RTNQuantizer  # noqa: E402

WIDTHS = (1, 2, 3, 4, 8)
GROUPS = (32, 64, 128, None)  # None = one group per row
K = 256  # every group size divides it; 4 K-blocks of 64
N = 48  # not a multiple of the N tile: exercises the N mask


INTERPRET = bool(os.environ.get("TRITON_INTERPRET"))
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(scope="module")
def mwm():
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("no CUDA device and TRITON_INTERPRET is unset (tests/conftest.py sets it without CUDA)")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if INTERPRET and not isinstance(tl.zeros, InterpretedFunction):
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set; set it in the environment")
    return importlib.import_module("moe_export.kernels.mixed_width_matmul")


def width_groups(expert_bits: list[int], n: int, k: int, group_size, symmetric) -> tuple:
    """RTN-quantized random experts in the width-group layout: (packed, scales, zeros, bits, expert_bits, slot).

    ``symmetric`` may be a dict {bits: bool} to mix symmetric and asymmetric groups in one layer.
    """
    rtn = RTNQuantizer()
    widths = sorted(set(expert_bits))
    slot = torch.zeros(len(expert_bits), dtype=torch.int64)
    packed, scales, zeros = [], [], []
    for b in widths:
        members = [e for e, eb in enumerate(expert_bits) if eb == b]
        sym = symmetric[b] if isinstance(symmetric, dict) else symmetric
        qws = [rtn.quantize(torch.randn(n, k) * 0.05, b, group_size, sym) for _ in members]
        slot[members] = torch.arange(len(members))
        packed.append(torch.stack([pack(q.qdata, b) for q in qws]))  # [E_b, N, K*b/8]
        scales.append(torch.stack([q.scale for q in qws]))  # [E_b, N, K/g]
        zeros.append(None if sym else torch.stack([q.zero for q in qws]))
    to = lambda ts: [None if t is None else t.to(DEVICE) for t in ts]  # noqa: E731
    return to(packed), to(scales), to(zeros), widths, torch.tensor(expert_bits, device=DEVICE), slot.to(DEVICE)


def assert_close(out, ref, what):
    err = (out.float() - ref.float()).abs()
    tol = 1e-5 * (1 + ref.abs().max().item())
    assert err.max().item() <= tol, f"{what}: max abs err {err.max().item():.3e} (mean {err.mean().item():.3e}) > {tol:.3e}"


def routed(num_experts, pairs, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    return torch.randint(0, num_experts, (pairs,), generator=g).to(DEVICE)


# --- unpack / dequantize: bit-exact ----------------------------------------------------------------

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [8, 96, 256])
@pytest.mark.parametrize("trans", [False, True], ids=["n-major", "k-major"])
def test_unpack_bit_exact(mwm, bits, k, trans):
    q = torch.randint(0, 2**bits, (2, 5, k), dtype=torch.uint8, device=DEVICE)
    out = mwm.unpack(pack(q, bits), bits, k, trans=trans)
    assert torch.equal(out, q)
    assert torch.equal(out, unpack(pack(q, bits), bits, k))


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_bit_exact(mwm, bits, group_size, symmetric):
    packed, scales, zeros, *_ = width_groups([bits, bits], 8, K, group_size, symmetric)
    trans = bits % 2 == 1  # the K-major tile of the grouped kernel for 1/3-bit, N-major for 2/4/8
    out = mwm.dequantize(packed[0], scales[0], zeros[0], bits, K, trans=trans)  # [2, 8, K]
    ref = torch.stack([reference.expert_weight(e, packed, scales, zeros, [bits], [bits, bits], [0, 1], K)
                       for e in range(2)])  # [2, 8, K]
    assert torch.equal(out, ref)


def test_dequantize_row_group_not_multiple_of_block(mwm):
    # K = 96 with a 64-wide K block: neither divides the other, the per-element scale path
    packed, scales, zeros, *_ = width_groups([3], 8, 96, None, False)
    ref = reference.expert_weight(0, packed, scales, zeros, [3], [3], [0], 96)
    for trans in (False, True):
        assert torch.equal(mwm.dequantize(packed[0], scales[0], zeros[0], 3, 96, block_k=64, trans=trans)[0], ref)


# --- the planted off-by-one must be caught ---------------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
def test_planted_off_by_one_is_caught(mwm, bits):
    packed, scales, zeros, *_ = width_groups([bits], 8, K, 64, False)
    q = unpack(packed[0], bits, K)
    assert torch.equal(mwm.unpack(packed[0], bits, K), q)  # sane without the fault
    assert not torch.equal(mwm.unpack(packed[0], bits, K, fault_bit_shift=1), q)
    ref_w = reference.expert_weight(0, packed, scales, zeros, [bits], [bits], [0], K)  # [8, K]
    assert torch.equal(mwm.dequantize(packed[0], scales[0], zeros[0], bits, K)[0], ref_w)
    assert not torch.equal(mwm.dequantize(packed[0], scales[0], zeros[0], bits, K, fault_bit_shift=1)[0], ref_w)


@pytest.mark.parametrize("path", ["gather", "grouped"])
def test_planted_off_by_one_fails_the_matmul_check(mwm, path):
    args = width_groups([3, 3], N, K, 64, False)  # 3 bits: values straddle bytes
    x = torch.randn(5, K, device=DEVICE)
    if path == "gather":
        ids = routed(2, 5)
        ref = reference.gather_mm(x, ids, *args)
        good, bad = (mwm.gather_mm(x, ids, *args, config=dict(BLOCK_N=64, BLOCK_K=128), fault_bit_shift=f)
                     for f in (0, 1))
    else:
        offs = torch.tensor([3, 5], dtype=torch.int32, device=DEVICE)
        ref = reference.grouped_mm(x, offs, *args)
        good, bad = (mwm.grouped_mm(x, offs, *args, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
                                    fault_bit_shift=f) for f in (0, 1))
    assert_close(good, ref, f"{path} without the fault")
    with pytest.raises(AssertionError, match="max abs err"):
        assert_close(bad, ref, f"{path} with planted off-by-one")


# --- decode (gather) and prefill (grouped) matmuls --------------------------------------------------

@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_gather_mm_per_width(mwm, bits, group_size):
    args = width_groups([bits] * 3, N, K, group_size, symmetric=bits == 1)
    x = torch.randn(3, K, device=DEVICE)
    ids = routed(3, 3)
    out = mwm.gather_mm(x, ids, *args, config=dict(BLOCK_N=64, BLOCK_K=128))
    assert_close(out, reference.gather_mm(x, ids, *args), f"gather {bits}-bit g={group_size}")


@pytest.mark.parametrize("bits", WIDTHS)
@pytest.mark.parametrize("group_size", GROUPS)
def test_grouped_mm_per_width(mwm, bits, group_size):
    args = width_groups([bits] * 3, N, K, group_size, symmetric=bits == 1)
    offs = torch.tensor([5, 5, 19], dtype=torch.int32, device=DEVICE)  # expert 1 gets no rows; 19 rows span 2 M-tiles
    x = torch.randn(19, K, device=DEVICE)
    out = mwm.grouped_mm(x, offs, *args, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128))
    assert_close(out, reference.grouped_mm(x, offs, *args), f"grouped {bits}-bit g={group_size}")


@pytest.mark.parametrize("group_size", [32, None], ids=["g32-tail", "row96-gather"])
def test_k_not_a_multiple_of_the_block(mwm, group_size):
    # K = 96 with 64-wide K blocks: a masked K tail; a 96-wide row group takes the per-element scale path
    args = width_groups([3, 4], 40, 96, group_size, False)
    x = torch.randn(6, 96, device=DEVICE)
    ids = torch.tensor([1, 0, 0, 1, 1, 0], device=DEVICE)
    out = mwm.gather_mm(x, ids, *args, config=dict(BLOCK_N=64, BLOCK_K=64))
    assert_close(out, reference.gather_mm(x, ids, *args), f"gather K=96 g={group_size}")
    offs = torch.tensor([2, 6], dtype=torch.int32, device=DEVICE)
    out = mwm.grouped_mm(x, offs, *args, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64))
    assert_close(out, reference.grouped_mm(x, offs, *args), f"grouped K=96 g={group_size}")


MIXED = [3, 1, 8, 2, 4, 3, 2, 4]  # all five widths in one layer, several experts per width
MIXED_SYM = {1: True, 2: False, 3: True, 4: False, 8: True}


@pytest.mark.parametrize("group_size", [32, None])
def test_gather_mm_mixed_widths(mwm, group_size):
    args = width_groups(MIXED, N, K, group_size, MIXED_SYM)
    x = torch.randn(10, K, device=DEVICE)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 2, 0], device=DEVICE)  # every expert, some twice
    out = mwm.gather_mm(x, ids, *args, config=dict(BLOCK_N=64, BLOCK_K=128))
    assert_close(out, reference.gather_mm(x, ids, *args), f"gather mixed g={group_size}")


@pytest.mark.parametrize("group_size", [64, None])
def test_grouped_mm_mixed_widths(mwm, group_size):
    args = width_groups(MIXED, N, K, group_size, MIXED_SYM)
    counts = torch.tensor([3, 0, 17, 1, 5, 2, 0, 4], device=DEVICE)
    offs = counts.cumsum(0).to(torch.int32)
    x = torch.randn(int(offs[-1]) + 3, K, device=DEVICE)  # 3 rows past offs[-1]: must come back zero
    out = mwm.grouped_mm(x, offs, *args, config=dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128))
    ref = reference.grouped_mm(x, offs, *args)
    assert_close(out, ref, f"grouped mixed g={group_size}")
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))


def test_half_precision_inputs(mwm):
    args = width_groups([3, 4], N, K, 64, False)
    x = torch.randn(4, K, dtype=torch.float16, device=DEVICE)
    ids = torch.tensor([0, 1, 1, 0], device=DEVICE)
    out = mwm.gather_mm(x, ids, *args, config=dict(BLOCK_N=32, BLOCK_K=64))
    assert out.dtype == torch.float16
    ref = reference.gather_mm(x, ids, *args)
    # both accumulate in float32 and round once to float16: within 1 ulp of float16
    assert (out.float() - ref.float()).abs().max() <= 2 ** -10 * ref.abs().max().float()


def test_autotune_configs_are_well_formed(mwm):
    for kind, kernel, table in (("gather", mwm._gather_mm_kernel, mwm.GATHER_CONFIGS),
                                ("grouped", mwm._grouped_mm_kernel, mwm.GROUPED_CONFIGS)):
        assert {"ampere", "hopper"} <= set(table)
        for name, configs in table.items():
            tuned = mwm._tuned(kind, name)
            assert tuned.configs == configs and set(tuned.keys) <= set(kernel.arg_names)
            for c in configs:
                blocks = c.kwargs
                assert set(blocks) <= set(kernel.arg_names), (kind, name, blocks)
                assert all(v & (v - 1) == 0 for v in blocks.values()), (kind, name, blocks)  # powers of two
                assert blocks["BLOCK_K"] % 8 == 0, (kind, name, blocks)  # whole octets per K block
                if kind == "grouped":
                    assert min(blocks.values()) >= 16, (kind, name, blocks)  # tl.dot's smallest tile
