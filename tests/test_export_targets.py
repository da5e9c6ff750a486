"""ExecuTorch and ONNX artifacts of mixed-width MoE models: graph contents, size, parity, greedy generation.

Thresholds come from measurements (1 thread, float32): .pte/.onnx logits differ from eager quantized by
1e-7..2e-7 absolute (logits of magnitude 0.6..15), i.e. summation order only; check_parity allows 1e-4
relative. A wrong lowering shows up as tens of dB below zero (measured -44 dB below).
"""

import copy
import json

import pytest
import torch

from moe_export.export.executorch import export_program, export_pte, lower_to_executorch, pte_ops
from moe_export.export.onnx import export_onnx, onnx_initializer_types, onnx_ops
from moe_export.eval import logits_fn_for
from moe_export.export.parity import ParityError, check_parity, compare
from moe_export.export.prepare import prepare_for_export, theoretical_size
from moe_export.export.runners import OnnxRunner, PteRunner
from moe_export.export.wrapper import DecoderStep
from moe_export.model_configs import tiny_random_model

# two layers of the tiny zoo model: every width present, 3-bit included
ZOO_BITS = [[3, 2, 3, 4, 2, 3, 8, 2], [2, 3, 2, 3, 4, 3, 2, 8]]


def _quantize(model, bits_per_layer, group_size=32, non_expert=None):
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.models import find_moe_layers
    from moe_export.plan.bitplan import BitPlan

    plan = BitPlan.uniform(find_moe_layers(model), 4, group_size=group_size)
    for lp, b in zip(plan.layers, bits_per_layer):
        lp.bits = list(b)
    flat = [b for bs in bits_per_layer for b in bs]
    plan.levels = sorted(set(flat), reverse=True)
    plan.target_avg_bits = sum(flat) / len(flat)
    if non_expert:  # roles -> {bits, group_size, symmetric}; the others stay as the plan has them
        plan.non_expert = {**plan.non_expert, **non_expert}
    return quantize_(copy.deepcopy(model), MoEQuantConfig(plan=plan), progress=False), plan


def _packed_bytes(prepared):
    from moe_export.export.experts import MixedWidthWeight

    return sum(getattr(m, f"packed_{b}").numel() for m in prepared.modules() if isinstance(m, MixedWidthWeight)
               for b in m.widths)


@pytest.fixture(scope="module")
def zoo(tiny_zoo_dir, tmp_path_factory):
    from moe_export.loading import load_float_model

    torch.manual_seed(0)
    fmodel = load_float_model(tiny_zoo_dir / "finetuned")
    qmodel, plan = _quantize(fmodel, ZOO_BITS)
    prepared = prepare_for_export(qmodel)
    out = tmp_path_factory.mktemp("zoo_export")
    step = DecoderStep(prepared, max_seq_len=64)
    pte = export_pte(step, out / "model.pte", mode="packed")
    onnx_path = export_onnx(step, out / "model.onnx")
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    return dict(f=fmodel, q=qmodel, prepared=prepared, pte=pte, onnx=onnx_path, ids=ids, plan=plan, out=out)


@pytest.mark.parametrize("target", ["pte", "onnx"])
def test_zoo_parity_and_greedy_generation(zoo, target):
    runner = PteRunner(zoo["pte"]) if target == "pte" else OnnxRunner(zoo["onnx"])
    rep = compare(runner, logits_fn_for(zoo["q"]), zoo["ids"], logits_fn_for(zoo["f"]), gen_model=zoo["q"],
                  gen_prompt=zoo["ids"][0, :8], new_tokens=32)
    check_parity(rep)  # prefill and KV-cache decode logits within 1e-4 relative, 32 greedy tokens identical
    assert rep.greedy_match == 32
    assert rep.max_abs_err_vs_eager < 1e-5 * max(rep.logit_scale, 1.0)  # measured <= 2e-7 absolute
    # the artifact costs exactly what the plan costs against float: nothing more
    assert abs(rep.sqnr_vs_float_db - rep.eager_sqnr_vs_float_db) < 0.01
    assert 3.0 < rep.eager_sqnr_vs_float_db < 60.0  # the mixed 2/3/4/8-bit plan really changes the logits


def test_zoo_pte_graph_keeps_packed_experts(zoo):
    ops = pte_ops(zoo["pte"])
    # in-graph unpack of gathered bytes: integer div/remainder, gather, batched matmul; no delegate in packed mode
    for op in ("aten::index_select.out", "aten::div.out_mode", "aten::remainder.Scalar_out", "aten::bmm.out"):
        assert ops.get(op, 0) > 0, (op, ops)
    assert "XnnpackBackend" not in ops
    from executorch.exir._serialize._program import deserialize_pte_binary

    plan = deserialize_pte_binary(zoo["pte"].read_bytes()).program.execution_plan[0]
    u8 = sum(_numel(v.val.sizes) for v in plan.values
             if type(v.val).__name__ == "Tensor" and v.val.data_buffer_idx > 0 and int(v.val.scalar_type) == 0)
    assert u8 == _packed_bytes(zoo["prepared"])  # every expert's bytes at its own width, nothing unpacked


def _numel(sizes):
    n = 1
    for s in sizes:
        n *= s
    return n


def test_zoo_onnx_graph_uses_quantized_ops(zoo):
    import onnx

    proto = onnx.load(str(zoo["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    assert proto.ir_version <= 10
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 21
    ops = onnx_ops(proto)
    # 2 layers x 2 weights x widths {2, 4, 8} -> GatherBlockQuantized; 3-bit -> Gather + Div/Mod unpack
    assert ops["com.microsoft::GatherBlockQuantized"] == 2 * 2 * 3
    assert ops["Mod"] > 0 and ops["Div"] > 0
    init = onnx_initializer_types(proto)
    assert "INT8" not in init  # no one-byte-per-weight expert tables
    assert init["UINT8"] >= _packed_bytes(zoo["prepared"])  # packed bytes (+ packed zero codes)


def test_zoo_sizes_vs_theoretical(zoo):
    theory = theoretical_size(zoo["prepared"])["total"]
    for path in (zoo["pte"], zoo["onnx"]):
        size = path.stat().st_size
        # measured: weights and scales are stored exactly; the excess is the graph itself (~0.1 MB for two
        # layers), 13% (.pte) and 8% (.onnx) of this 0.9 MB model, under 2% from ~5 MB up (test_size_within_5pct)
        assert theory <= size <= 1.25 * theory, (path.name, size, theory)


def test_second_architecture_both_targets(tmp_path):
    fmodel = tiny_random_model("Qwen3MoeForCausalLM", seed=0, num_hidden_layers=1).eval()
    qmodel, _ = _quantize(fmodel, [[2, 3, 3, 2, 2, 3, 2, 3]])  # two widths keep the graph (and export time) small
    step = DecoderStep(prepare_for_export(qmodel), max_seq_len=48)
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 12))
    for runner in (PteRunner(export_pte(step, tmp_path / "m.pte")), OnnxRunner(export_onnx(step, tmp_path / "m.onnx"))):
        rep = check_parity(compare(runner, logits_fn_for(qmodel), ids, logits_fn_for(fmodel), gen_model=qmodel,
                                   gen_prompt=ids[0, :4], new_tokens=32))
        assert rep.greedy_match == 32 and abs(rep.sqnr_vs_float_db - rep.eager_sqnr_vs_float_db) < 0.01


class _HeadStep(torch.nn.Module):
    """Decoder-step signature (tokens, pos, k, v) -> (logits, k, v) around one linear: a small graph for
    lowering experiments that the runners and the parity check handle like a real model."""

    def __init__(self, vocab=64, dim=64):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, input_pos, k_cache, v_cache):
        return self.head(self.emb(tokens)), k_cache + 0, v_cache + 0


def test_parity_catches_wrong_xnnpack_lowering():
    """torchao weight-only int4 lowered through XNNPACK with the subclass kept: no error, wrong numbers."""
    from torchao.quantization import IntxWeightOnlyConfig, PerGroup
    from torchao.quantization import quantize_ as ao_quantize_

    step = _HeadStep().eval()
    ao_quantize_(step.head, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))
    cache = torch.zeros(1, 1, 1, 16, 4)
    example = (torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, dtype=torch.long), cache, cache)
    ep = torch.export.export(step, example, dynamic_shapes=({1: torch.export.Dim("T", min=1, max=16)}, None, None, None))
    runner = PteRunner(lower_to_executorch(ep, "xnnpack").buffer)
    assert runner.cache_shape == tuple(cache.shape)

    def eager(ids):
        with torch.no_grad():
            return step(ids, torch.zeros(1, dtype=torch.long), cache, cache)[0]

    rep = compare(runner, eager, torch.randint(0, 64, (1, 6)))
    assert rep.sqnr_vs_eager_db < 0  # measured -44 dB on the full tiny model's lm_head
    with pytest.raises(ParityError, match="max abs err"):
        check_parity(rep)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["OlmoeForCausalLM", "MixtralForCausalLM"])
def test_more_architectures_and_xnnpack_mode(arch, tmp_path):
    fmodel = tiny_random_model(arch, seed=0, num_hidden_layers=2).eval()
    qmodel, _ = _quantize(fmodel, [[2, 3, 4, 8, 2, 3, 4, 2], [3, 3, 2, 2, 4, 4, 8, 8]])
    step = DecoderStep(prepare_for_export(qmodel), max_seq_len=48)
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 12))
    pte = export_pte(step, tmp_path / "x.pte", mode="xnnpack")
    assert pte_ops(pte).get("XnnpackBackend", 0) > 0
    for runner in (PteRunner(pte), OnnxRunner(export_onnx(step, tmp_path / "m.onnx"))):
        check_parity(compare(runner, logits_fn_for(qmodel), ids, gen_model=qmodel, gen_prompt=ids[0, :4]))


@pytest.mark.slow
def test_size_within_5pct(tmp_path):
    # Experts dominate real MoE models; at H=256, I=512 the graph is < 2% of the file.
    fmodel = tiny_random_model("MixtralForCausalLM", seed=0, num_hidden_layers=1, hidden_size=256,
                               intermediate_size=512).eval()
    qmodel, _ = _quantize(fmodel, [[2, 3, 4, 8, 2, 3, 4, 2]])
    prepared = prepare_for_export(qmodel)
    theory = theoretical_size(prepared)["total"]
    step = DecoderStep(prepared, max_seq_len=32)
    for path in (export_pte(step, tmp_path / "m.pte"), export_onnx(step, tmp_path / "m.onnx")):
        assert abs(path.stat().st_size / theory - 1) < 0.05, (path.name, path.stat().st_size, theory)


def test_cli_export_onnx(tmp_path):
    from click.testing import CliRunner

    from moe_export.checkpoint import save_quantized
    from moe_export.cli import main

    fmodel = tiny_random_model("MixtralForCausalLM", seed=0, num_hidden_layers=1).eval()
    qmodel, plan = _quantize(fmodel, [[2, 4, 2, 4, 4, 2, 8, 2]])
    qdir = save_quantized(qmodel, tmp_path / "q", plan=plan)
    res = CliRunner().invoke(main, ["export", str(qdir), "--to", "onnx", "--onnx-mode", "packed", "-o",
                                    str(tmp_path / "out"), "--max-seq-len", "48", "--no-latency", "-q"])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    (row,) = report["artifacts"]
    assert row["parity_ok"] and row["parity"]["greedy_match"] == 32
    assert "model.onnx" in res.output
    bad = CliRunner().invoke(main, ["export", str(qdir), "--to", "tflite", "-o", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "tflite" in bad.output


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_shared_expert_architectures_both_targets(arch, tmp_path):
    """Qwen2-MoE (gated shared expert) and DeepSeek-V3 (shared experts, grouped routing, MLA latent KV cache) export
    with their shared experts packed at 8 bits; ~2-4 min each on the loaded 2-core box."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.export.pipeline import export_artifacts
    from tests._mixed_plans import mixed_plan

    model = tiny_random_model(arch, seed=0)
    plan = mixed_plan(model, widths=(3, 2))
    plan.non_expert["shared_experts"] = {"bits": 8, "group_size": 32, "symmetric": True}
    quantize_(model, MoEQuantConfig(plan), progress=False)
    report = export_artifacts(model, tmp_path, targets=("pte", "onnx"), max_seq_len=32, latency=False, progress=False,
                              new_tokens=8)
    assert [(a["target"], a["parity_ok"], a["parity"]["greedy_match"]) for a in report["artifacts"]] == [
        ("pte", True, 8), ("onnx", True, 8)]


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["tiny-qwen3moe", "tiny-olmoe"])
def test_zoo_qwen3moe_and_olmoe_plan_quantize_export(entry, tmp_path):
    """The tiny Qwen3-MoE and OLMoE zoo models (built once, ~3 min each at 1 thread) through the CLI: plan, quantize,
    export to .pte and .onnx with parity."""
    from tests._zoo_cli import plan_quantize_export

    report, _ = plan_quantize_export(entry, tmp_path)
    assert [(a["target"], a["parity_ok"]) for a in report["artifacts"]] == [("pte", True), ("onnx", True)]
