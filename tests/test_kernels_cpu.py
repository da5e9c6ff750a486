"""The C++ CPU mixed-width mat-vec (kernels/cpu_mixed_width.cpp) against the plain-torch dequantize reference.

The extension builds once per machine (~30-90 s, cached in the torch_extensions dir); the session fixture
builds it up front so a build failure shows as one clear error. Tolerance: the reference is float64
(dequantize in float64, float64 mat-vec); the kernel sums in float32 in another order. Measured worst
|kernel - ref| / sum_k |w_k x_k| over this file: 2.8e-7 (float32 eps 1.2e-7, K = 256); the bound is 1e-6.
"""

import pytest
import torch

from moe_export.kernels import cpu_ops
from moe_export.quant.packing import pack
from moe_export.quant.rtn import RTNQuantizer
from moe_export.tensors import MixedWidthExpertsTensor
from moe_export.tensors.functional import dequantize_packed

TOL = 1e-6  # of sum_k |w x|, see the module docstring
OP = torch.ops.moe_export.cpu_mixed_width_gemv


@pytest.fixture(scope="session", autouse=True)
def ext():
    ext = cpu_ops.load(True)
    assert cpu_ops.kernel() is ext  # the op dispatches to the build, not to the torch fallback
    return ext


def _group(bits, e, n, k, g, sym, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(e, n, k)
    qs = [RTNQuantizer().quantize(w[i], bits, g, sym) for i in range(e)]
    p = torch.stack([pack(q.qdata, bits) for q in qs])
    s = torch.stack([q.scale for q in qs])
    z = None if qs[0].zero is None else torch.stack([q.zero for q in qs])
    return p, s, z


def _ref64(x, idx, p, s, z, bits):
    k = x.shape[1]
    safe = idx.clamp(min=0)
    w = dequantize_packed(p[safe], s[safe], None if z is None else z[safe], bits, k, torch.float64)  # [S, N, K]
    y = torch.einsum("snk,sk->sn", w, x.double())
    mag = torch.einsum("snk,sk->sn", w.abs(), x.double().abs())  # error scale of a K-term float32 sum
    off = (idx < 0).unsqueeze(-1)
    return y.masked_fill(off, 0), mag.masked_fill(off, 1)


def _rel_err(out, x, idx, p, s, z, bits):
    ref, mag = _ref64(x, idx, p, s, z, bits)
    return ((out.double() - ref).abs() / mag).max().item()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128, None])
@pytest.mark.parametrize("sym", [True, False])
def test_op_matches_dequantize_reference(bits, group, sym):
    e, n, k = 3, 40, 256
    p, s, z = _group(bits, e, n, k, group or k, sym)
    assert (z is None) == sym
    for t in range(1, 9):
        x = torch.randn(t, k)
        # -1: the pair's expert lives in another width group; all-equal ids: every pair in one expert batch
        for idx in (torch.randint(-1, e, (t,)), torch.full((t,), e - 1)):
            out = OP(x, idx, p, s, z, bits)
            err = _rel_err(out, x, idx, p, s, z, bits)
            assert err < TOL, f"b={bits} g={group} sym={sym} T={t} ids={idx.tolist()}: rel err {err:.3g} >= {TOL}"
            assert (out[idx < 0] == 0).all()
    print(f"b={bits} g={group} sym={sym}: last rel err {err:.2e}")


def test_mixed_widths_in_one_layer_through_routed_linear():
    from moe_export.experts import routed_linear

    bits = [1, 2, 3, 4, 8, 3, 2]
    torch.manual_seed(1)
    w = torch.randn(len(bits), 48, 128)
    # one stack shares its symmetry: asymmetric here, the per-width cases cover symmetric
    qws = [RTNQuantizer().quantize(w[i], b, 32, False) for i, b in enumerate(bits)]
    t = MixedWidthExpertsTensor.from_quantized(qws)
    wd = t.dequantize(torch.float64)  # [E, N, K]
    for tokens in range(1, 9):
        x = torch.randn(tokens, 128)
        ids = torch.randint(0, len(bits), (tokens,))
        out = routed_linear(t, x, ids)
        ref = torch.einsum("snk,sk->sn", wd[ids], x.double())
        mag = torch.einsum("snk,sk->sn", wd[ids].abs(), x.double().abs())
        err = ((out.double() - ref).abs() / mag).max().item()
        assert err < TOL, f"T={tokens}: rel err {err:.3g}"


def test_planted_wrong_shift_is_caught():
    """The comparison notices codes read one bit off: shift every packed row's bit stream by one."""
    p, s, z = _group(3, 2, 16, 128, 32, False)
    x, idx = torch.randn(4, 128), torch.tensor([0, 1, 1, 0])
    rows = p.reshape(-1, p.shape[-1]).to(torch.int64)  # a wrong shift, planted in the data
    carry = torch.cat([rows[:, 1:] & 1, torch.zeros_like(rows[:, :1])], 1)
    bad = ((rows >> 1) | (carry << 7)).to(torch.uint8).reshape(p.shape)
    assert _rel_err(OP(x, idx, p, s, z, 3), x, idx, p, s, z, 3) < TOL
    assert _rel_err(OP(x, idx, bad, s, z, 3), x, idx, p, s, z, 3) > 1e-2


def test_opcheck_and_fake_validation():
    p, s, z = _group(2, 2, 16, 64, 32, False)
    x, idx = torch.randn(3, 64), torch.tensor([1, -1, 0])
    torch.library.opcheck(OP.default, (x, idx, p, s, z, 2))
    torch.library.opcheck(OP.default, (x, idx, p, s, None, 2))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx, fi, fp, fs = (mode.from_tensor(a) for a in (x, idx, p, s))
        assert OP(fx, fi, fp, fs, None, 2).shape == (3, 16)
        with pytest.raises(ValueError, match="packed must be uint8"):
            OP(fx, fi, fp, fs, None, 3)  # 3 bits need 24 bytes per row, not 16
        with pytest.raises(ValueError, match="idx must be int64"):
            OP(fx, fi.int(), fp, fs, None, 2)


def test_compiled_call_has_no_graph_break_and_matches_eager():
    p, s, z = _group(4, 3, 32, 128, 64, True)
    x, idx = torch.randn(2, 128), torch.tensor([2, 0])

    def f(x, idx):
        return OP(x, idx, p, s, z, 4) * 2.0

    explain = torch._dynamo.explain(f)(x, idx)
    assert explain.graph_break_count == 0
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, idx)
    assert torch.equal(out, f(x, idx))


@pytest.mark.slow
def test_portable_build_matches_reference():
    """The scalar path (no AVX2) that other CPUs get; a second build, so -m slow."""
    ext = cpu_ops.load(False)
    assert not ext.has_simd()
    for bits in cpu_ops.KERNEL_BITS:
        p, s, z = _group(bits, 2, 24, 256, 64, bits % 2 == 0)
        x, idx = torch.randn(5, 256), torch.tensor([0, 1, -1, 1, 0])
        out = ext.mixed_width_gemv(x, idx, p, s, z, bits, cpu_ops._zconst(bits))
        err = _rel_err(out, x, idx, p, s, z, bits)
        assert err < TOL, f"portable b={bits}: rel err {err:.3g}"


@pytest.mark.parametrize("seq_len", [1, 6])
def test_model_with_kernel_matches_torch_paths(monkeypatch, seq_len):
    """moe_export_mixed on CPU: the C++ op (eager) against the pure-torch formulations it replaces
    (``MOE_EXPORT_CPU_KERNEL=0``: compiled gathered mat-vec at T=1, dense width groups at T=6, eager loop)."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.model_configs import tiny_random_model
    from tests._mixed_plans import mixed_plan

    torch._dynamo.reset()
    model = tiny_random_model("Qwen3MoeForCausalLM", num_layers=1)
    quantize_(model, MoEQuantConfig(mixed_plan(model)), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    with torch.no_grad():
        with_kernel = model(ids).logits
        monkeypatch.setattr(cpu_ops, "ENABLED", False)
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(ids).logits
    for name, other in (("eager loop", eager), ("compiled torch path", compiled)):
        rel = ((with_kernel - other).abs().max() / other.abs().max()).item()
        assert rel < 1e-5, f"T={seq_len}: kernel vs {name} rel err {rel:.3g}"


def test_no_compiler_falls_back_to_torch_with_one_warning(monkeypatch):
    def broken(simd=True):
        raise RuntimeError("g++: not found")

    monkeypatch.setattr(cpu_ops, "load", broken)
    monkeypatch.setattr(cpu_ops, "_failed", False)
    p, s, z = _group(3, 2, 16, 64, 32, True)
    x, idx = torch.randn(3, 64), torch.tensor([1, -1, 0])
    with pytest.warns(RuntimeWarning, match="did not build"):
        out = OP(x, idx, p, s, z, 3)
    assert _rel_err(out, x, idx, p, s, z, 3) < TOL
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        OP(x, idx, p, s, z, 3)
