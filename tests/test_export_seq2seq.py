"""Encoder-decoder (SwitchTransformers) export: an encoder program and a decoder step with cross-attention inputs
(moe_export/export/seq2seq.py), to .pte (one program, methods ``encoder`` and ``forward``) and .onnx (the decoder step
and its encoder beside it), every expert at its own width; parity against the eager quantized model per target,
the ops in each graph, the modes that have no form for top-1 ungated experts, and the prefix-LM scoring of
``moe-export eval`` on the artifacts.

Measured on the tiny random Switch below (1 thread, float32): .pte and .onnx logits within 2.2e-6 of eager quantized
(logits up to ~5; 131-133 dB SQNR), 32/32 greedy tokens; check_parity allows 1e-4 relative.
"""

import copy
import json
import math

import pytest
import torch

from moe_export.eval import logits_fn_for, prefix_split
from moe_export.export.parity import check_parity, compare
from moe_export.export.prepare import prepare_for_export
from moe_export.export.runners import EagerStepRunner, FullForwardRunner, OnnxRunner, PteRunner, greedy_generate
from moe_export.export.seq2seq import Seq2SeqStep, encoder_path
from moe_export.model_configs import tiny_random_model

ARCH = "SwitchTransformersForConditionalGeneration"
WIDTHS = (2, 3, 4, 8)  # expert e at WIDTHS[e % 4]: every container case of the packed forms


def _quantized(model, widths=WIDTHS):
    from moe_export.api import MoEQuantConfig, quantize_
    from tests._mixed_plans import mixed_plan

    q = copy.deepcopy(model)
    return quantize_(q, MoEQuantConfig(plan=mixed_plan(q, widths=widths)), progress=False)


@pytest.fixture(scope="module")
def switch():
    fmodel = tiny_random_model(ARCH, seed=0)
    qmodel = _quantized(fmodel)
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    return dict(f=fmodel, q=qmodel, step=Seq2SeqStep(prepare_for_export(qmodel), max_seq_len=48), ids=ids)


@pytest.fixture(scope="module")
def artifacts(switch, tmp_path_factory):
    from moe_export.export.executorch import export_pte
    from moe_export.export.onnx import export_onnx

    out = tmp_path_factory.mktemp("switch_export")
    return dict(pte=export_pte(switch["step"], out / "model-packed.pte", mode="packed"),
                onnx=export_onnx(switch["step"], out / "model.onnx", mode="packed"))


@pytest.mark.parametrize("which", ["f", "q"])
def test_step_prefill_and_decode_match_hf_forward(switch, which):
    """The eager encoder program + decoder step reproduce the transformers model (float, and quantized with 2/3/4/8-bit
    experts), prefill and one token at a time through the cache."""
    model = switch[which]
    step = switch["step"] if which == "q" else Seq2SeqStep(prepare_for_export(model), max_seq_len=48)
    ids = switch["ids"]
    ref = logits_fn_for(model)(ids)[0]
    rep = check_parity(compare(EagerStepRunner(step), logits_fn_for(model), ids, gen_model=model,
                               gen_prompt=ids[0, :8], new_tokens=8))
    assert rep.greedy_match == 8
    assert rep.max_abs_err_vs_eager < 1e-5 * max(rep.logit_scale, 1.0)
    P = prefix_split(ids.shape[1])
    assert ref[: P - 1].abs().max() == 0 and ref[P - 1 : -1].abs().max() > 0  # only the decoder half is scored


def test_step_refuses_steps_without_a_source_and_the_callers_model_is_unchanged(switch):
    runner = EagerStepRunner(switch["step"])
    with pytest.raises(ValueError, match="encode"):
        runner.step(torch.zeros(1, 2, dtype=torch.long), 0)
    # the step runs eager attention in its own copy of the configs; the caller's model keeps its implementation
    assert switch["step"].blocks[0].layer[0].SelfAttention.config._attn_implementation == "eager"
    fresh = tiny_random_model(ARCH, seed=0)
    assert switch["f"].config._attn_implementation == fresh.config._attn_implementation
    assert switch["f"].encoder.config._attn_implementation == fresh.encoder.config._attn_implementation
    assert switch["step"].max_tokens == 48  # bounded by min(max_seq_len, expert_capacity=64)
    wide = Seq2SeqStep(prepare_for_export(switch["f"]), max_seq_len=128)
    assert wide.max_tokens == switch["f"].config.expert_capacity  # no call sees more tokens than the capacity


def test_full_forward_runner_greedy_is_the_prefix_lm(switch):
    """The cache-free reference the artifacts' greedy decoding is checked against: the encoder reads the prompt, the
    decoder starts from its last token."""
    model, prompt = switch["q"], switch["ids"][0, :8]
    got = greedy_generate(FullForwardRunner(model), prompt, 4)
    dec = prompt[-1:].reshape(1, 1)
    want = []
    with torch.no_grad():
        for _ in range(4):
            nxt = int(model(input_ids=prompt[None], decoder_input_ids=dec, use_cache=False).logits[0, -1].argmax())
            want.append(nxt)
            dec = torch.cat([dec, torch.tensor([[nxt]])], dim=1)
    assert got == want


@pytest.mark.parametrize("target", ["pte", "onnx"])
def test_artifacts_match_eager_quantized(switch, artifacts, target):
    runner = PteRunner(artifacts["pte"]) if target == "pte" else OnnxRunner(artifacts["onnx"])
    assert runner.seq2seq
    rep = compare(runner, logits_fn_for(switch["q"]), switch["ids"], logits_fn_for(switch["f"]), gen_model=switch["q"],
                  gen_prompt=switch["ids"][0, :8], new_tokens=32)
    check_parity(rep)  # prefill and cached decode within 1e-4 relative, 32 greedy tokens identical
    assert rep.greedy_match == 32
    assert rep.max_abs_err_vs_eager < 1e-5 * max(rep.logit_scale, 1.0)  # measured <= 2.2e-6 at logits ~5
    assert abs(rep.sqnr_vs_float_db - rep.eager_sqnr_vs_float_db) < 0.01  # the artifact costs what the plan costs
    assert 3.0 < rep.eager_sqnr_vs_float_db < 60.0  # the 2/3/4/8-bit experts really change the logits


def test_pte_is_one_program_with_encoder_and_decoder_methods(artifacts, switch):
    from executorch.exir._serialize._program import deserialize_pte_binary

    from moe_export.export.executorch import pte_ops
    from moe_export.export.experts import MixedWidthWeight

    program = deserialize_pte_binary(artifacts["pte"].read_bytes()).program
    assert sorted(p.name for p in program.execution_plan) == ["encoder", "forward"]
    ops = pte_ops(artifacts["pte"])
    # routed experts gathered as bytes and unpacked in the graph (integer div/remainder), batched matmuls
    for op in ("aten::index_select.out", "aten::div.out_mode", "aten::remainder.Scalar_out", "aten::bmm.out"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert not any(op.startswith("moe_export::") for op in ops)  # no native kernel: it computes SwiGLU experts
    u8 = sum(math.prod(v.val.sizes) for plan in program.execution_plan for v in plan.values
             if type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx > 0 and int(v.val.scalar_type) == 0)
    packed = sum(getattr(m, f"packed_{b}").numel() for m in switch["step"].modules() if isinstance(m, MixedWidthWeight)
                 for b in m.widths)
    enc = sum(getattr(m, f"packed_{b}").numel() for m in switch["step"].encoder_program.modules()
              if isinstance(m, MixedWidthWeight) for b in m.widths)
    assert u8 == packed + enc  # every expert's bytes at its own width, once, in the method that runs it


def test_onnx_is_a_decoder_step_and_its_encoder(artifacts):
    import onnx

    from moe_export.export.onnx import onnx_metadata, onnx_ops

    enc = encoder_path(artifacts["onnx"])
    assert enc.name == "model.encoder.onnx" and enc.is_file()
    for path, inputs in ((artifacts["onnx"], ["tokens", "input_pos", "k_cache", "v_cache", "cross_k", "cross_v"]),
                         (enc, ["source"])):
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto, full_check=True)
        assert [i.name for i in proto.graph.input] == inputs
        ops = onnx_ops(proto)
        # one MoE block per program x (wi, wo) x widths {2, 4, 8}: GatherBlockQuantized; 3-bit: Gather + Div/Mod unpack
        assert ops["com.microsoft::GatherBlockQuantized"] == 2 * 3, ops
        assert ops["Mod"] > 0 and ops["ArgMax"] == 1 and ops["Relu"] == 2  # top-1 router, ungated relu experts
    assert onnx_metadata(artifacts["onnx"])["moe_export.encoder"] == enc.name
    runner = OnnxRunner(artifacts["onnx"])
    assert runner.max_tokens == 48  # min(max_seq_len, expert capacity): longer calls are refused, not run
    with pytest.raises(ValueError, match="49 source tokens in one call exceed the 48"):
        runner.encode(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="encoder of model.onnx"):
        OnnxRunner(enc)


def test_modes_without_a_form_for_switch_are_refused_or_routed(switch, tmp_path):
    from moe_export.export.executorch import export_pte
    from moe_export.export.onnx import export_onnx
    from moe_export.export.pipeline import seq2seq_modes

    with pytest.raises(ValueError, match="--pte-mode packed or xnnpack"):
        export_pte(switch["step"], tmp_path / "x.pte", mode="native")
    with pytest.raises(ValueError, match="--onnx-mode packed"):
        export_onnx(switch["step"], tmp_path / "x.onnx", mode="native")
    assert not list(tmp_path.iterdir())
    # export_artifacts (and so `moe-export export` with its default modes) runs the best mode that has a form
    (pte,) = seq2seq_modes("pte", ["native"])
    assert pte[0] == "xnnpack" and "native" in pte[1]
    assert seq2seq_modes("pte", ["native", "xnnpack", "packed"]) == [("xnnpack", None), ("packed", None)]
    assert seq2seq_modes("onnx", ["native", "fast"])[0][0] == "packed" and len(seq2seq_modes("onnx", ["native", "fast"])) == 1
    assert seq2seq_modes("onnx", ["packed"]) == [("packed", None)]


def test_eval_scores_the_artifact_as_the_model(switch, artifacts):
    """`moe-export eval` scores an encoder-decoder artifact with the same prefix LM as the checkpoint: equal logits on
    the scored positions, zeros (unscored) before them."""
    from moe_export.export.runners import logits_fn

    ids = torch.randint(0, switch["q"].config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    ref = logits_fn_for(switch["q"])(ids)
    got = logits_fn(OnnxRunner(artifacts["onnx"]))(ids)
    assert got.shape == ref.shape and logits_fn(OnnxRunner(artifacts["onnx"])).score_from(16) == 7
    assert (got - ref).abs().max() < 1e-5 * ref.abs().max()


@pytest.mark.slow
def test_zoo_switch_plan_quantize_export_eval(tmp_path):
    """The tiny SwitchTransformers zoo model (built once, ~1-2 min) through the CLI with the default modes: plan,
    quantize, export to .pte and .onnx (routed to xnnpack / packed, said in the report), and `moe-export eval` of the
    .onnx and the .pte within 1% of the checkpoint's bits per byte on both corpora (measured: equal to 4 decimals)."""
    from click.testing import CliRunner

    from moe_export.cli import main
    from tests._zoo_cli import plan_quantize_export

    report, output = plan_quantize_export("tiny-switch", tmp_path)
    assert "exported as 'xnnpack'" in output and "exported as 'packed'" in output
    assert [(a["target"], a["mode"], a["parity_ok"], a["parity"]["greedy_match"]) for a in report["artifacts"]] == [
        ("pte", "xnnpack", True, 32), ("onnx", "packed", True, 32)]
    run = CliRunner()
    scores = {}
    for target in (tmp_path / "q", tmp_path / "ex" / "model.onnx", tmp_path / "ex" / "model-xnnpack.pte"):
        res = run.invoke(main, ["eval", str(target), "--n-cloze", "50", "--json", str(tmp_path / "e.json"), "-q"])
        assert res.exit_code == 0, (target, res.output)
        scores[target.name] = json.loads((tmp_path / "e.json").read_text())
    ref = scores["q"]["results"]
    for name in ("model.onnx", "model-xnnpack.pte"):
        for corpus, r in scores[name]["results"].items():
            want = ref[corpus]["bpb"]["bits_per_byte"]
            assert abs(r["bpb"]["bits_per_byte"] - want) <= 0.01 * want, (name, corpus, r["bpb"], want)


def test_bfloat16_checkpoint_step_computes_in_float32(switch):
    """A bfloat16 Switch checkpoint quantizes in its dtype; its export step computes in float32 from the same packed
    bytes (export.prepare.to_float32_) and reproduces the quantized model computing in float32 (measured 3.6e-6 at
    logits ~5), as the decoder-only exports do."""
    from moe_export.export.prepare import float32_copy

    fbf16 = copy.deepcopy(switch["f"]).to(torch.bfloat16)
    qbf16 = _quantized(fbf16)
    wi = qbf16.encoder.block[1].layer[-1].mlp.experts.expert_0.wi.weight
    assert qbf16.dtype == torch.bfloat16 and type(wi).__name__ == "PackedLinearWeight" and wi.dtype == torch.bfloat16
    step = Seq2SeqStep(prepare_for_export(qbf16), max_seq_len=48)
    assert all(p.dtype != torch.bfloat16 for p in step.parameters())
    rep = check_parity(compare(EagerStepRunner(step), logits_fn_for(float32_copy(qbf16)), switch["ids"]))
    assert rep.max_abs_err_vs_eager < 1e-5 * max(rep.logit_scale, 1.0)
