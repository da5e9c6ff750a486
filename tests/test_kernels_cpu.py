"""The C++ CPU mixed-width mat-vec (moe_export/kernels/cpu_mixed_width.cpp) against the plain-torch dequantize reference.

The extension builds once per machine (~30-90 s, cached in the torch_extensions dir); the session fixture
builds it up front so a build failure shows as one clear error. Tolerance: the reference is float64
(dequantize in float64, float64 mat-vec); the kernel sums in float32 in another order. Measured worst
|kernel - ref| / sum_k |w_k x_k| over this file: 2.8e-7 (float32 eps 1.2e-7, K = 256); the bound is 1e-6.
"""

import pytest
import torch
import torch.nn.functional as F

from moe_export.kernels import cpu_ops
from moe_export.runtime.layout import dequantize_packed, pack
from moe_export.quant.rtn import RTNQuantizer
from moe_export.tensors import MixedWidthExpertsTensor

TOL = 1e-6  # of sum_k |w x|, see the module docstring
OP = torch.ops.moe_export.cpu_mixed_width_gemv


@pytest.fixture(scope="session", autouse=True)
def ext():
    ext = cpu_ops.load(True)
    assert cpu_ops.kernel() is ext  # the op dispatches to the build, not to the torch fallback
    assert cpu_ops.fused_ready()  # and the dispatcher ops of the same build exist
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


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
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


@pytest.mark.parametrize("bits", [1, 3, 6, 8])
def test_packed_gather_is_the_layout_dequantize(ext, bits):
    """Embedding rows from the core's ``packed_gather``: bit-exact with ``runtime.layout.dequantize_packed``."""
    p, s, z = _group(bits, 1, 50, 96, 32, bits % 2 == 0)
    ids = torch.tensor([[7, 0], [49, 7]])
    rows = ext.packed_gather(ids, p[0], s[0], None if z is None else z[0], bits, 96)  # [2, 2, K]
    full = dequantize_packed(p[0], s[0], None if z is None else z[0], bits, 96)  # [V, K]
    assert torch.equal(rows, full[ids])


def test_kernel_path_is_reported(ext):
    assert cpu_ops.kernel_path() == ext.kernel_path() in ("scalar", "avx2", "avx-vnni", "avx512-vnni")


def test_mixed_widths_in_one_layer_through_routed_linear():
    from moe_export.runtime.dispatch import routed_linear

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


# ----------------------------------------------------------------------- the fused dispatcher ops
# moe_export::cpu_packed_linear (one packed 2-D weight) and moe_export::cpu_moe_ffn (a whole routed SwiGLU
# expert layer). Same reference and error scale as above. The FFN's output carries the gate_up rounding
# through SiLU(gate) * up, so its error scale is sum_j |w_j| (|W_down| @ a_scale_j), with a_scale the
# float64 |a| plus the first-order propagation of the gate_up scale |W_up| @ |x| (see _ffn_ref64).
# Measured worst: 4.7e-7 for cpu_packed_linear (2-bit whole-row groups, K = 256), 4.3e-8 for cpu_moe_ffn;
# the bound is 1e-6 as above, and a weight one code off moves the output by ~1e-2 of that scale.


def _packed_weight(bits, n, k, g, sym, seed=0):
    p, s, z = _group(bits, 1, n, k, g or k, sym, seed)
    return p[0], s[0], None if z is None else z[0]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [32, 64, 128, None, 24])
@pytest.mark.parametrize("sym", [True, False])
def test_packed_linear_matches_reference(bits, group, sym):
    """Group 24 (not a multiple of the 16-code unit) takes the 8-lane path; N = 37 leaves a partial row tile."""
    k = 192 if group == 24 else 256
    p, s, z = _packed_weight(bits, 37, k, group, sym)
    w = dequantize_packed(p, s, z, bits, k, torch.float64)  # [N, K]
    for shape in ((1, k), (2, k), (5, k), (2, 3, k)):
        x = torch.randn(shape)
        out = torch.ops.moe_export.cpu_packed_linear(x, p, s, z, bits)
        assert out.shape == (*shape[:-1], 37) and out.dtype == torch.float32
        ref = x.double() @ w.T
        mag = x.double().abs() @ w.abs().T
        err = ((out.double() - ref).abs() / mag).max().item()
        assert err < TOL, f"b={bits} g={group} sym={sym} x{tuple(shape)}: rel err {err:.3g} >= {TOL}"


def test_packed_linear_catches_a_planted_wrong_shift():
    p, s, z = _packed_weight(3, 16, 128, 32, False)
    x = torch.randn(2, 128)
    w = dequantize_packed(p, s, z, 3, 128, torch.float64)
    rows = p.to(torch.int64)
    carry = torch.cat([rows[:, 1:] & 1, torch.zeros_like(rows[:, :1])], 1)
    bad = ((rows >> 1) | (carry << 7)).to(torch.uint8)
    mag = x.double().abs() @ w.abs().T
    good_err = ((torch.ops.moe_export.cpu_packed_linear(x, p, s, z, 3).double() - x.double() @ w.T).abs() / mag).max()
    bad_err = ((torch.ops.moe_export.cpu_packed_linear(x, bad, s, z, 3).double() - x.double() @ w.T).abs() / mag).max()
    assert good_err < TOL and bad_err > 1e-2


def _ffn_layer(widths, h, inter, group, sym, seed=0):
    """gate_up [E, 2I, H] and down [E, H, I] stacks at the given per-expert widths."""
    torch.manual_seed(seed)
    up = MixedWidthExpertsTensor.from_quantized(
        [RTNQuantizer().quantize(torch.randn(2 * inter, h), b, group, sym) for b in widths])
    down = MixedWidthExpertsTensor.from_quantized(
        [RTNQuantizer().quantize(torch.randn(h, inter) * 0.1, b, group, sym) for b in widths])
    return up, down


def _ffn_args(x, ids, wts, up, down):
    ws = up.widths
    return (x, ids, wts, list(up.bit_widths), list(up.slots), list(ws),
            [getattr(up, f"packed_{b}") for b in ws], [getattr(up, f"scale_{b}") for b in ws],
            [getattr(up, f"zero_{b}") for b in ws], [getattr(down, f"packed_{b}") for b in ws],
            [getattr(down, f"scale_{b}") for b in ws], [getattr(down, f"zero_{b}") for b in ws])


def _ffn_ref64(x, ids, wts, up, down):
    wu, wd = up.dequantize(torch.float64), down.dequantize(torch.float64)  # [E, 2I, H], [E, H, I]
    inter = wu.shape[1] // 2
    t, k = ids.shape
    out = torch.zeros(t, wd.shape[1], dtype=torch.float64)
    mag = torch.zeros_like(out)
    for i in range(t):
        for j in range(k):
            e = int(ids[i, j])
            h = wu[e] @ x[i].double()
            mh = wu[e].abs() @ x[i].double().abs()  # error scale of each gate_up dot product
            g, u = h[:inter], h[inter:]
            sig = torch.sigmoid(g)
            dsilu = sig * (1 + g * (1 - sig))
            a = F.silu(g) * u
            # first-order propagation of the gate_up error scale through SiLU(gate) * up
            a_scale = a.abs() + dsilu.abs() * mh[:inter] * u.abs() + F.silu(g).abs() * mh[inter:]
            out[i] += float(wts[i, j]) * (wd[e] @ a)
            mag[i] += abs(float(wts[i, j])) * (wd[e].abs() @ a_scale)
    return out, mag


@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("sym", [True, False])
def test_moe_ffn_matches_reference(group, sym):
    """Every width in one layer; T = 1..8 tokens, top-2, with experts shared between tokens (batched pairs)."""
    widths = [1, 2, 3, 4, 8, 3, 2]
    up, down = _ffn_layer(widths, 256, 128, group, sym)
    worst = 0.0
    for t in range(1, 9):
        x = torch.randn(t, 256)
        ids = torch.stack([torch.randperm(len(widths))[:2] for _ in range(t)])
        if t > 2:
            ids[1] = ids[0]  # the same pair of experts for two tokens
        wts = torch.rand(t, 2)
        out = torch.ops.moe_export.cpu_moe_ffn(*_ffn_args(x, ids, wts, up, down))
        ref, mag = _ffn_ref64(x, ids, wts, up, down)
        err = ((out.double() - ref).abs() / mag).max().item()
        worst = max(worst, err)
        assert err < TOL, f"g={group} sym={sym} T={t} ids={ids.tolist()}: rel err {err:.3g} >= {TOL}"
    print(f"g={group} sym={sym}: worst rel err {worst:.2e}")


def test_moe_ffn_equals_the_torch_experts_path():
    """The fused op against routed_gather (the per-width mat-vecs + torch glue it replaces), in float32."""
    from moe_export.runtime.dispatch import fused_cpu_forward, routed_gather

    class Experts(torch.nn.Module):  # the attributes the experts implementation reads
        has_gate, has_bias, is_transposed = True, False, False

        def __init__(self, up, down):
            super().__init__()
            self.gate_up_proj, self.down_proj, self.act_fn = up, down, torch.nn.SiLU()

        def _apply_gate(self, h):
            gate, up_ = h.chunk(2, dim=-1)
            return self.act_fn(gate) * up_

    ex = Experts(*_ffn_layer([3, 2, 4, 2, 3, 8], 128, 64, 32, False))
    x, ids, wts = torch.randn(3, 128), torch.tensor([[0, 5], [2, 3], [5, 1]]), torch.rand(3, 2)
    a, b = fused_cpu_forward(ex, x, ids, wts), routed_gather(ex, x, ids, wts)
    assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


def test_fused_ops_reject_bad_inputs_eager_and_fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    up, down = _ffn_layer([2, 3], 64, 32, 32, False)
    x, ids, wts = torch.randn(2, 64), torch.tensor([[0, 1], [1, 0]]), torch.rand(2, 2)
    args = _ffn_args(x, ids, wts, up, down)
    ffn = torch.ops.moe_export.cpu_moe_ffn
    p, s, z = _packed_weight(4, 8, 64, 32, False)
    lin = torch.ops.moe_export.cpu_packed_linear
    bad_ffn = {
        "x must be float32": (x.double(),) + args[1:],
        "topk_ids must be int64": (x, ids.int()) + args[2:],
        "topk_weights must be a float": (x, ids, wts[:, :1]) + args[3:],
        "one packed/scale/zero entry per width": args[:6] + (args[6][:1],) + args[7:],
        "has width 4": args[:3] + ([4, 3],) + args[4:],
    }
    with FakeTensorMode() as mode:
        fake = lambda a: tuple(mode.from_tensor(v) if isinstance(v, torch.Tensor) else
                               [mode.from_tensor(u) if isinstance(u, torch.Tensor) else u for u in v] if isinstance(v, list)
                               else v for v in a)
        assert ffn(*fake(args)).shape == (2, 64)
        assert lin(*fake((torch.randn(3, 64), p, s, z, 4))).shape == (3, 8)
        for msg, a in bad_ffn.items():
            if msg == "has width 4":
                msg = "expert_bits"
            with pytest.raises(ValueError, match=msg):
                ffn(*fake(a))
        with pytest.raises(ValueError, match="packed must be uint8"):
            lin(*fake((torch.randn(3, 64), p, s, z, 3)))  # 3 bits need 24 bytes a row, not 32
    for msg, a in bad_ffn.items():
        with pytest.raises(RuntimeError, match=msg):
            ffn(*a)
    with pytest.raises(RuntimeError, match="outside"):
        ffn(x, torch.tensor([[0, 2], [1, 0]]), *args[2:])  # expert 2 does not exist
    with pytest.raises(RuntimeError, match="packed rows hold"):
        lin(torch.randn(3, 64), p, s, z, 3)
    with pytest.raises(RuntimeError, match="bits must be"):
        lin(torch.randn(3, 64), p, s, z, 9)  # every width 1..8 has a kernel
    with pytest.raises(RuntimeError, match="x must be float32"):
        lin(torch.randn(3, 64).double(), p, s, z, 4)


def test_fused_ops_opcheck_and_compile_without_graph_breaks():
    up, down = _ffn_layer([4, 2, 2], 64, 32, 32, True)
    x, ids, wts = torch.randn(2, 64), torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 2)
    args = _ffn_args(x, ids, wts, up, down)
    p, s, z = _packed_weight(8, 24, 64, None, True)
    torch.library.opcheck(torch.ops.moe_export.cpu_moe_ffn.default, args)
    torch.library.opcheck(torch.ops.moe_export.cpu_packed_linear.default, (x, p, s, z, 8))

    def f(x, ids, wts):
        h = torch.ops.moe_export.cpu_moe_ffn(x, ids, wts, *args[3:])
        return torch.ops.moe_export.cpu_packed_linear(h * 2.0, p, s, z, 8)

    explain = torch._dynamo.explain(f)(x, ids, wts)
    assert explain.graph_break_count == 0
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, ids, wts)
    assert torch.equal(out, f(x, ids, wts))


@pytest.mark.parametrize("seq_len", [1, 3])
def test_model_with_fused_ops_matches_torch_paths(monkeypatch, seq_len):
    """A quantized model with packed attention (4-bit) and lm_head (8-bit): the fused C++ ops (eager, and
    compiled) against the pure-torch formulations (``MOE_EXPORT_CPU_KERNEL=0``); the fused FFN really runs."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.runtime import dispatch
    from moe_export.model_configs import tiny_random_model
    from tests._mixed_plans import mixed_plan

    torch._dynamo.reset()
    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    plan = mixed_plan(model)
    plan.non_expert = {**plan.non_expert, "attention": {"bits": 4, "group_size": 32, "symmetric": False},
                       "lm_head": {"bits": 8, "group_size": None, "symmetric": True}}
    quantize_(model, MoEQuantConfig(plan), progress=False)
    calls = []
    real = dispatch.EXPERT_FORMULATIONS["cpu_fused"]
    monkeypatch.setitem(dispatch.EXPERT_FORMULATIONS, "cpu_fused", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    with torch.no_grad():
        with_kernel = model(ids).logits
        assert calls, "the fused expert FFN was not used"
        compiled_kernel = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(ids).logits
        monkeypatch.setattr(cpu_ops, "ENABLED", False)
        torch._dynamo.reset()
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(ids).logits
    for name, other in (("eager torch", eager), ("compiled torch", compiled), ("compiled kernel", compiled_kernel)):
        rel = ((with_kernel - other).abs().max() / other.abs().max()).item()
        assert rel < 1e-5, f"T={seq_len}: kernel vs {name} rel err {rel:.3g}"
