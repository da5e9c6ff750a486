"""The ``moe_export::mixed_width_*`` custom ops: CPU reference, fake kernels, compile/export, experts path.

Method: the CPU implementation (``kernels.reference``) is checked against an independent dense
computation built from ``QuantizedWeight.dequantize()`` (no packing involved); the fake kernels are
checked with ``torch.library.opcheck``, with bad inputs under FakeTensorMode, and by tracing with
``torch.compile(fullgraph=True)`` and ``torch.export``. ``runtime.dispatch.cuda_forward`` (the CUDA
path of the experts implementation) is device-agnostic above the ops, so it is checked here on CPU
against a float top-k MoE on the dequantized weights, for the decode and the prefill formulation.
"""

from __future__ import annotations

import contextlib
import re
import types

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

import moe_export.kernels  # noqa: F401  (defines torch.ops.moe_export.mixed_width_*)
from moe_export.runtime import dispatch
from moe_export.runtime.layout import pack
from moe_export.quant.rtn import RTNQuantizer

ops = torch.ops.moe_export


def quantized_experts(expert_bits, n, k, group_size=32, symmetric=False):
    rtn = RTNQuantizer()
    return [rtn.quantize(torch.randn(n, k) * 0.05, b, group_size, symmetric) for b in expert_bits]


def width_groups(qws):
    """(packed, scales, zeros, bits, expert_bits, slot) from per-expert QuantizedWeights."""
    widths = sorted({q.bits for q in qws})
    slot, packed, scales, zeros = [0] * len(qws), [], [], []
    for b in widths:
        members = [e for e, q in enumerate(qws) if q.bits == b]
        for i, e in enumerate(members):
            slot[e] = i
        packed.append(torch.stack([pack(qws[e].qdata, b) for e in members]))
        scales.append(torch.stack([qws[e].scale for e in members]))
        zeros.append(None if qws[0].symmetric else torch.stack([qws[e].zero for e in members]))
    return packed, scales, zeros, widths, torch.tensor([q.bits for q in qws]), torch.tensor(slot)


MIXED = [3, 2, 4, 2, 8, 1]


@pytest.fixture
def layer():
    qws = quantized_experts(MIXED, 24, 64)
    return qws, width_groups(qws)


def test_gather_op_matches_dense_dequantize(layer):
    qws, args = layer
    x = torch.randn(7, 64)
    ids = torch.tensor([0, 5, 2, 2, 4, 1, 3])
    out = ops.mixed_width_gather_mm(x, ids, *args)
    dense = torch.stack([q.dequantize() for q in qws])  # [E, N, K]
    ref = torch.einsum("sk,snk->sn", x, dense[ids])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_grouped_op_matches_dense_dequantize(layer):
    qws, args = layer
    offs = torch.tensor([2, 2, 5, 6, 9, 10], dtype=torch.int32)
    x = torch.randn(12, 64)  # 2 rows past offs[-1]
    out = ops.mixed_width_grouped_mm(x, offs, *args)
    ids = torch.repeat_interleave(torch.arange(6), torch.diff(offs, prepend=torch.tensor([0])).long())
    dense = torch.stack([q.dequantize() for q in qws])
    ref = torch.einsum("sk,snk->sn", x[:10], dense[ids])
    torch.testing.assert_close(out[:10], ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[10:], torch.zeros(2, 24))


def test_opcheck(layer):
    # schema, autograd registration and fake-vs-real metadata; compile is covered by the tests below
    _, args = layer
    x = torch.randn(5, 64)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.mixed_width_gather_mm.default, (x, torch.tensor([0, 1, 2, 3, 5]), *args), test_utils=utils)
    torch.library.opcheck(ops.mixed_width_grouped_mm.default,
                          (x, torch.tensor([1, 1, 2, 3, 4, 5], dtype=torch.int32), *args), test_utils=utils)


def _bad_calls(args):
    packed, scales, zeros, bits, ebits, slot = args
    x, ids = torch.randn(3, 64), torch.tensor([0, 1, 2])
    yield "x must be a 2-D", (x[None], ids, *args)
    yield "x must be a 2-D float16/bfloat16/float32", (x.to(torch.float64), ids, *args)
    yield "expert_ids must be a 1-D int32/int64", (x, ids.float(), *args)
    yield "packed \\(3-bit\\) must be uint8", (x, ids, [p.to(torch.int8) if b == 3 else p for b, p in zip(bits, packed)],
                                              scales, zeros, bits, ebits, slot)
    # K = 64 does not match the packed bytes of 72 columns
    yield "packed \\(1-bit\\) must be uint8 \\[E_b, N=24, K\\*b/8=9\\]", (torch.randn(3, 72), ids, *args)
    three = [torch.cat([s, s[..., :1]], -1) for s in scales]  # 3 groups per row of K = 64
    yield "scales \\(1-bit\\) have 3 groups per row, which does not divide K = 64", (x, ids, packed, three, three, bits, ebits, slot)
    yield "scales \\(2-bit\\) must be float16", (x, ids, packed, [s.float() if b == 2 else s for b, s in zip(bits, scales)],
                                                 zeros, bits, ebits, slot)
    yield "zeros \\(4-bit\\) must be None or float16", (x, ids, packed, scales,
                                                        [z[:, :-1] if b == 4 else z for b, z in zip(bits, zeros)], bits, ebits, slot)
    yield "each width must appear once", (x, ids, packed, scales, zeros, [1, 2, 2, 4, 8], ebits, slot)
    yield "bit widths must be in 1..8", (x, ids, packed, scales, zeros, [1, 2, 3, 4, 9], ebits, slot)
    yield "the width groups hold 6 experts but expert_bits lists 5", (x, ids, packed, scales, zeros, bits, ebits[:5], slot[:5])
    yield "slot has 5 entries", (x, ids, packed, scales, zeros, bits, ebits, slot[:5])
    yield "non-empty lists of one length", (x, ids, packed, scales[:-1], zeros, bits, ebits, slot)


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_bad_inputs_fail_with_a_clear_message(layer, fake):
    _, args = layer
    for message, call in _bad_calls(args):
        mode = FakeTensorMode() if fake else contextlib.nullcontext()
        if fake:
            call = tuple(_to_fake(mode, a) for a in call)
        with mode:
            try:
                ops.mixed_width_gather_mm(*call)
            except ValueError as err:
                assert re.search(message, str(err)), f"expected /{message}/, got: {err}"
            else:
                pytest.fail(f"no ValueError for the call that should say /{message}/")


def _to_fake(mode, a):
    if isinstance(a, torch.Tensor):
        return mode.from_tensor(a)
    if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
        return [None if t is None else mode.from_tensor(t) for t in a]
    return a


def test_bad_values_fail_in_the_reference(layer):
    _, (packed, scales, zeros, bits, ebits, slot) = layer
    with pytest.raises(ValueError, match="expert id 6 is out of range"):
        ops.mixed_width_gather_mm(torch.randn(1, 64), torch.tensor([6]), packed, scales, zeros, bits, ebits, slot)
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.mixed_width_grouped_mm(torch.randn(4, 64), torch.tensor([2, 1, 2, 3, 4, 4], dtype=torch.int32),
                                   packed, scales, zeros, bits, ebits, slot)


class _TwoLayer(torch.nn.Module):
    """x -> gather(up) -> silu -> grouped(down): both ops in one graph."""

    def __init__(self, up, down):
        super().__init__()
        self.up, self.down = up, down

    def forward(self, x, ids, offs):
        h = F.silu(ops.mixed_width_gather_mm(x, ids, *self.up))  # [S, N]
        return ops.mixed_width_grouped_mm(h, offs, *self.down)  # [S, K]


def _two_layer_inputs():
    up = width_groups(quantized_experts(MIXED, 32, 64))
    down = width_groups(quantized_experts(MIXED, 64, 32))
    ids = torch.tensor([0, 0, 1, 2, 2, 3, 4, 5])  # sorted, so the grouped op sees expert-contiguous rows
    offs = torch.tensor([2, 3, 5, 6, 7, 8], dtype=torch.int32)
    return _TwoLayer(up, down), (torch.randn(8, 64), ids, offs)


def test_compile_fullgraph_traces_the_ops():
    model, inputs = _two_layer_inputs()
    eager = model(*inputs)
    explain = torch._dynamo.explain(model)(*inputs)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*inputs), eager, rtol=0, atol=0)


def test_export_keeps_the_ops():
    model, inputs = _two_layer_inputs()
    ep = torch.export.export(model, inputs)
    code = ep.graph_module.code
    assert "moe_export.mixed_width_gather_mm" in code and "moe_export.mixed_width_grouped_mm" in code
    torch.testing.assert_close(ep.module()(*inputs), model(*inputs), rtol=0, atol=0)


# --- the experts implementation's CUDA path, run on CPU through the ops' reference --------------------

def _experts_module(bits, hidden=32, inter=16):
    from moe_export.tensors import MixedWidthExpertsTensor

    up = quantized_experts(bits, 2 * inter, hidden)
    down = quantized_experts(bits, hidden, inter, group_size=16)

    def apply_gate(h):
        gate, val = h.chunk(2, dim=-1)
        return F.silu(gate) * val

    self = types.SimpleNamespace(
        gate_up_proj=MixedWidthExpertsTensor.from_quantized(up), down_proj=MixedWidthExpertsTensor.from_quantized(down),
        has_gate=True, has_bias=False, _apply_gate=apply_gate, num_experts=len(bits))
    dense = (torch.stack([q.dequantize() for q in up]), torch.stack([q.dequantize() for q in down]))
    return self, dense


@pytest.mark.parametrize("tokens", [3, 40], ids=["decode", "prefill"])
def test_mixed_experts_forward_matches_float_moe(tokens):
    bits = [3, 2, 4, 2, 8, 1, 3, 2]
    self, (w_up, w_down) = _experts_module(bits)
    assert (tokens * 2 <= dispatch.CUDA_DECODE_MAX_PAIRS) == (tokens == 3)  # one test per formulation
    x = torch.randn(tokens, 32)
    top_w, top_i = torch.randn(tokens, len(bits)).softmax(-1).topk(2, dim=-1)
    out = dispatch.cuda_forward(self, x, top_i, top_w)
    ref = torch.zeros_like(x)
    for t in range(tokens):
        for j in range(2):
            e = top_i[t, j]
            ref[t] += top_w[t, j] * (self._apply_gate(x[t] @ w_up[e].T) @ w_down[e].T)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_experts_dispatch_point_is_wired(monkeypatch):
    # the table sends CUDA tensors to the Triton formulations (gather at decode, grouped at prefill)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    cuda = types.SimpleNamespace(is_cuda=True)
    assert dispatch.select_experts(None, cuda, torch.zeros(3, 2)) == "cuda_gather"
    assert dispatch.select_experts(None, cuda, torch.zeros(40, 2)) == "cuda_grouped"
    assert dispatch.EXPERT_FORMULATIONS["cuda_gather"] is dispatch.cuda_gather
    assert dispatch.EXPERT_FORMULATIONS["cuda_grouped"] is dispatch.cuda_grouped
