"""bfloat16 and float16 checkpoints end to end: quantize (in memory and streamed), the fused CPU op in eager and
compiled, save/load (load_quantized and from_pretrained), export to .pte and .onnx with parity.

The float weights keep the checkpoint's dtype and the experts compute in it; scales and zeros are float16 whatever
the dtype (the quantizers compute in float32 from the weights). Exported steps compute in float32
(``export.prepare.HALF_DTYPES``) and are checked against the same quantized model computing in float32.
"""

from __future__ import annotations

import pytest
import torch

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.checkpoint import save_quantized
from moe_export.export.parity import sqnr
from moe_export.hf import load_quantized
from moe_export.loading import load_float_model
from moe_export.model_configs import tiny_random_model
from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight
from tests._mixed_plans import mixed_plan

DTYPES = [torch.bfloat16, torch.float16]
# Logits of the tiny random Mixtral computed in the half dtype against the same quantized weights computing in
# float32 (the rounding of the half activations only): measured 48 dB (bf16) and 66 dB (fp16) on one layer.
MIN_SQNR_VS_FLOAT32_DB = {torch.bfloat16: 40.0, torch.float16: 55.0}


def _half_checkpoint(folder, dtype, **overrides):
    """A float checkpoint saved in ``dtype``, as real MoE checkpoints are published (bfloat16)."""
    tiny_random_model("MixtralForCausalLM", seed=3, num_layers=1, **overrides).to(dtype).save_pretrained(folder)
    return folder


def _quantized(tmp_path, dtype):
    model = load_float_model(_half_checkpoint(tmp_path / "src", dtype))
    assert model.dtype == dtype  # a bfloat16 checkpoint is quantized as bfloat16, not upcast
    plan = mixed_plan(model, widths=(3, 2))  # two widths keep the exported graphs (and export time) small
    plan.non_expert["attention"] = {"bits": 8, "group_size": None, "symmetric": True}
    plan.validate()
    return quantize_(model, MoEQuantConfig(plan), progress=False)


def _parts(t):
    names, attrs = t.__tensor_flatten__()
    return {n: getattr(t, n) for n in names}, attrs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_save_load_and_from_pretrained(tmp_path, dtype):
    import transformers

    model = _quantized(tmp_path, dtype)
    up = model.model.layers[0].mlp.experts.gate_up_proj
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    assert isinstance(up, MixedWidthExpertsTensor) and isinstance(q_proj, PackedLinearWeight)
    assert up.dtype == q_proj.dtype == dtype
    assert {up.scale_2.dtype, up.zero_2.dtype, q_proj.scale.dtype} == {torch.float16}  # the stated scale dtype
    assert model.model.embed_tokens.weight.dtype == dtype  # kept-float weights keep the checkpoint's bytes
    save_quantized(model, tmp_path / "q", source_dir=tmp_path / "src")
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        want = model(ids).logits
    for loaded in (load_quantized(tmp_path / "q"),
                   transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))):
        assert loaded.dtype == dtype
        a, b = dict(model.named_parameters()), dict(loaded.named_parameters())
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], (MixedWidthExpertsTensor, PackedLinearWeight)):
                (pa, aa), (pb, ab) = _parts(a[k]), _parts(b[k])
                assert aa == ab and pa.keys() == pb.keys(), k
                assert all(torch.equal(pa[n], pb[n]) for n in pa), k
            else:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_cpu_op_runs_half_activations_eager_and_compiled(tmp_path, monkeypatch, dtype):
    """The fused C++ expert op applies to bf16/fp16 layers (converted to float32 once per call), eager and compiled,
    and matches the same weights computing in float32."""
    from moe_export.kernels import cpu_ops
    from moe_export.runtime import dispatch

    # The kernel tests require the build (test_kernels_cpu asserts it); a skip here would hide a bf16 fallback.
    assert cpu_ops.fused_ready(), "the C++ CPU kernel did not build"
    model = _quantized(tmp_path, dtype)
    chosen = []
    fused = dispatch.EXPERT_FORMULATIONS["cpu_fused"]
    monkeypatch.setitem(dispatch.EXPERT_FORMULATIONS, "cpu_fused", lambda *a: (chosen.append(a[1].dtype), fused(*a))[1])
    torch._dynamo.reset()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        eager = model(ids).logits
        assert chosen == [dtype], "eager did not run the fused op on the half activations"
        compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")(ids).logits
        assert chosen == [dtype, dtype], "compiled did not run the fused op"
        assert eager.dtype == compiled.dtype == dtype
        assert torch.equal(eager, compiled)
        ref = model.float()(ids).logits  # the same packed bytes computing in float32
    assert sqnr(ref, eager.float()) > MIN_SQNR_VS_FLOAT32_DB[dtype], sqnr(ref, eager.float())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_export_pte_and_onnx_with_parity(tmp_path, dtype):
    from moe_export.export.pipeline import export_artifacts

    model = _quantized(tmp_path, dtype)
    report = export_artifacts(model, tmp_path / "out", targets=("pte", "onnx"), max_seq_len=32, latency=False,
                              progress=False, new_tokens=8)
    assert report["dtype"] == {"checkpoint": str(dtype).removeprefix("torch."), "artifacts": "float32"}
    assert [(a["target"], a["parity_ok"]) for a in report["artifacts"]] == [("pte", True), ("onnx", True)]
    for a in report["artifacts"]:
        assert a["parity"]["greedy_match"] == 8
    assert model.dtype == dtype  # the caller's model is left as it was


def test_streamed_bf16_checkpoint_equals_in_memory(tmp_path):
    """Streaming reads a bfloat16 checkpoint into the same packed bytes and bfloat16 float weights as quantize_."""
    from moe_export.plan.bitplan import BitPlan
    from moe_export.streaming import quantize_checkpoint

    ref = _quantized(tmp_path, torch.bfloat16)
    quantize_checkpoint(tmp_path / "src", BitPlan.from_json(ref.moe_export_plan.to_json()), tmp_path / "s", "rtn",
                        progress=False)
    streamed = load_quantized(tmp_path / "s")
    a, b = dict(streamed.named_parameters()), dict(ref.named_parameters())
    assert a.keys() == b.keys()
    for k in b:
        if isinstance(b[k], (MixedWidthExpertsTensor, PackedLinearWeight)):
            (pa, aa), (pb, ab) = _parts(a[k]), _parts(b[k])
            assert aa == ab and all(torch.equal(pa[n], pb[n]) for n in pb), k
        else:
            assert a[k].dtype == b[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]), k
