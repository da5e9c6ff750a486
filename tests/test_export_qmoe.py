"""A routed-expert layer as one com.microsoft.QMoE node per width group, against the eager quantized layer.

Per width: containers whose CPU kernel computes in fp32 (4-bit, and 3-bit moved into 4-bit codes) must match the
eager layer to summation order; the int8-activation / LUT kernels (2- and 8-bit containers) by SQNR.
"""

import copy

import pytest
import torch

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.export.parity import max_abs_err, sqnr
from moe_export.export.qmoe import APPROXIMATE_CONTAINERS, CONTAINER, moe_layer_model, qmoe_weights
from moe_export.model_configs import tiny_random_model
from moe_export.runtime.layout import pack, unpack
from tests._mixed_plans import mixed_plan


def _session(model):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _layer_and_model(widths, symmetric, group_size=32):
    model = tiny_random_model("MixtralForCausalLM")
    plan = mixed_plan(model, widths=widths, group_size=group_size)
    plan.quantizer.symmetric = symmetric
    q = quantize_(copy.deepcopy(model), MoEQuantConfig(plan), progress=False)
    return q.model.layers[0].mlp, q.config


@pytest.mark.parametrize("widths,symmetric", [((4,), True), ((4,), False), ((3, 4), True), ((3, 4), False),
                                              ((1, 2, 3, 4, 8), True), ((2, 3, 4, 8), False)])
def test_qmoe_layer_matches_eager_quantized_layer(widths, symmetric):
    block, cfg = _layer_and_model(widths, symmetric)
    ex = block.experts
    present = sorted(set(ex.gate_up_proj.bit_widths))
    assert set(present) == set(widths)
    x = torch.randn(16, cfg.hidden_size)
    with torch.no_grad():
        ref = block(x[None])[0]  # [T, H] the model's own routing and moe_export_mixed experts
    onnx_model = moe_layer_model(ex.gate_up_proj.width_groups(), ex.down_proj.width_groups(), block.gate.weight,
                                 cfg.num_experts_per_tok)
    ops = [n.op_type for n in onnx_model.graph.node]
    assert ops.count("QMoE") == len(present)  # one node per width group
    got = torch.from_numpy(_session(onnx_model).run(None, {"hidden": x.numpy()})[0])
    approx = any(CONTAINER[b] in APPROXIMATE_CONTAINERS for b in present)
    if approx:  # measured 38-42 dB (2-bit LUT and 8-bit int8-activation kernels); a wrong layout is below 0 dB
        assert sqnr(ref, got) > 30.0
    else:  # measured 4-6e-9 against outputs of 0.01 (125 dB): summation order only
        assert max_abs_err(ref, got) < 1e-5 * float(ref.abs().max()) and sqnr(ref, got) > 100.0


def test_container_codes_reproduce_every_width_exactly():
    """Dequantizing the QMoE form (container codes, implied or stored zero points) gives our weights bit for bit."""
    torch.manual_seed(0)
    for bits in range(1, 9):
        for symmetric in (True, False):  # asymmetric with integer zero codes, as RTN and GPTQ store them
            q = torch.randint(0, 2**bits, (2, 4, 64), dtype=torch.uint8)
            scale = (torch.rand(2, 4, 2) + 0.1).half()
            zero = None if symmetric else torch.randint(0, 2**bits, (2, 4, 2)).half()
            ours_zero = (0.5 if bits == 1 else 2 ** (bits - 1)) if symmetric else zero.float().repeat_interleave(32, -1)
            want = (q.float() - ours_zero) * scale.float().repeat_interleave(32, -1)
            f = qmoe_weights(bits, pack(q, bits), scale, zero, 64)
            c = f["bits"]
            codes = torch.from_numpy(f["w"])
            qc = unpack(codes, c, 64).float()
            if f["zp"] is None:
                zc = 2 ** (c - 1)
            else:
                zc = unpack(torch.nn.functional.pad(torch.from_numpy(f["zp"]), (0, c - f["zp"].shape[-1])), c, 8)
                zc = zc[..., :2].float().repeat_interleave(32, -1)
            got = (qc - zc) * torch.from_numpy(f["s"]).repeat_interleave(32, -1)
            assert c == CONTAINER[bits] and torch.equal(got, want), (bits, symmetric)
            rows = torch.tensor([1, 0, 3, 2])  # a row permutation (the SwiGLU interleave) moves whole rows
            fr = qmoe_weights(bits, pack(q, bits), scale, zero, 64, rows)
            for key in ("w", "s", "zp"):
                assert (fr[key] is None) == (f[key] is None)
                assert f[key] is None or torch.equal(torch.from_numpy(fr[key]), torch.from_numpy(f[key])[:, rows])


def test_fractional_zero_points_are_refused():
    q = torch.randint(0, 8, (1, 4, 64), dtype=torch.uint8)
    with pytest.raises(ValueError, match="integer zero codes"):
        qmoe_weights(3, pack(q, 3), torch.ones(1, 4, 2).half(), torch.full((1, 4, 2), 2.5).half(), 64)
    block, cfg = _layer_and_model((1, 4), False)  # 1-bit asymmetric RTN binarises around the group mean
    with pytest.raises(ValueError, match="1-bit asymmetric"):
        moe_layer_model(block.experts.gate_up_proj.width_groups(), block.experts.down_proj.width_groups(),
                        block.gate.weight, 2)


def test_projections_of_other_widths_or_group_sizes_are_refused():
    """QMoE takes one width per expert and one block size per node: a plan that gives gate_up and down different
    ones (a byte-budget plan can) is refused in one line, not exported with the wrong block size."""
    import dataclasses

    block, cfg = _layer_and_model((4,), True)
    gu, dn = block.experts.gate_up_proj.width_groups(), block.experts.down_proj.width_groups()
    with pytest.raises(ValueError, match="one block size per node"):
        moe_layer_model(gu, dataclasses.replace(dn, group_size=64), block.gate.weight, 2)


def _ort_optimized(path, tmp_path):
    """The graph onnxruntime runs (after its fusions) for the model at ``path``, as a ModelProto."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath)


def _ort_optimized_ops(path, tmp_path) -> dict[str, int]:
    """Operator counts of the graph onnxruntime runs (after its fusions) for the model at ``path``."""
    from moe_export.export.onnx import onnx_ops

    return {k.split("::")[-1]: v for k, v in onnx_ops(_ort_optimized(path, tmp_path)).items()}


def _matmuls_shaped(proto, last_dims: tuple[int, int]) -> list[str]:
    """MatMul nodes of ``proto`` whose inferred output ends in ``last_dims``."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {vi.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
              for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [n.name for n in inferred.graph.node if n.op_type == "MatMul" and shapes.get(n.output[0], ())[-2:] == last_dims]


def test_reciprocal_roots_become_divisions():
    """``Mul(x, Reciprocal(Sqrt(v)))`` (torch's rsqrt) becomes ``Div(x, Sqrt(v))``, the form onnxruntime fuses
    into an RMS norm kernel; a reciprocal read elsewhere too stays. Same outputs to float rounding."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from moe_export.export.onnx import _divide_by_root, onnx_ops

    nodes = [helper.make_node("Sqrt", ["v"], ["s"]), helper.make_node("Reciprocal", ["s"], ["r"]),
             helper.make_node("Mul", ["r", "x"], ["y"]),  # either operand order
             helper.make_node("Sqrt", ["x"], ["s2"]), helper.make_node("Reciprocal", ["s2"], ["r2"]),
             helper.make_node("Mul", ["v", "r2"], ["z"]), helper.make_node("Add", ["r2", "z"], ["w"])]  # r2 read twice
    info = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3]) for n in ("v", "x", "y", "w")]
    model = helper.make_model(helper.make_graph(nodes, "g", info[:2], info[2:]), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert _divide_by_root(model.graph) == 1
    assert onnx_ops(model) == {"Sqrt": 2, "Div": 1, "Reciprocal": 1, "Mul": 1, "Add": 1}
    onnx.checker.check_model(model)
    feed = {"v": np.array([4.0, 2.0, 9.0], np.float32), "x": np.array([1.0, 3.0, 0.5], np.float32)}
    want, got = (_session(m).run(None, feed) for m in (before, model))
    for a, b in zip(want, got):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_decoder_step_exports_as_qmoe_nodes(tmp_path):
    """`export_onnx(mode="native")`: every MoE block becomes QMoE nodes (one per width group), nothing of the
    placeholder is left, and the whole step matches the eager quantized model (4-bit containers, fp32: exact)."""
    import onnx

    from moe_export.eval import logits_fn_for
    from moe_export.export.onnx import export_onnx, onnx_metadata, onnx_ops
    from moe_export.export.parity import check_parity, compare
    from moe_export.export.prepare import prepare_for_export
    from moe_export.export.runners import OnnxRunner
    from moe_export.export.wrapper import DecoderStep

    model = tiny_random_model("MixtralForCausalLM")
    plan = mixed_plan(model, widths=(4, 3))
    plan.quantizer.symmetric = True
    q = quantize_(copy.deepcopy(model), MoEQuantConfig(plan), progress=False)
    step = DecoderStep(prepare_for_export(q), 32)
    path = export_onnx(step, tmp_path / "m.onnx", mode="native", accuracy_level=0)
    ops = onnx_ops(path)
    n_layers = model.config.num_hidden_layers
    assert ops.get("com.microsoft::QMoE", ops.get("QMoE", 0)) == 2 * n_layers, ops
    proto = onnx.load(str(path))
    assert not any(n.domain == "com.moe_export" for n in proto.graph.node)
    assert {o.domain for o in proto.opset_import} >= {"", "com.microsoft"} and "com.moe_export" not in {
        o.domain for o in proto.opset_import}
    assert onnx_metadata(path)["moe_export.containers"] == '{"3": 4, "4": 4}'
    # grouped attention: the cache is not copied per query head (repeat_kv's Expand); the same step exported in
    # another form keeps transformers' eager attention
    assert model.config.num_key_value_heads < model.config.num_attention_heads and "Expand" not in ops
    assert onnx_ops(export_onnx(step, tmp_path / "p.onnx", mode="packed"))["Expand"]
    # RMS norms as x / sqrt(mean(x^2) + eps) * w: onnxruntime fuses each into one SimplifiedLayerNormalization
    assert "Reciprocal" not in ops and _ort_optimized_ops(path, tmp_path)["SimplifiedLayerNormalization"] == 2 * n_layers + 1
    # the cache rows are scattered (one ScatterElements for k and one for v a layer, beside the routing's one), and
    # no MatMul makes a cache-shaped [.., S, D] tensor (the one-hot write of the other forms)
    assert ops["ScatterElements"] == 3 * n_layers, ops
    assert not _matmuls_shaped(proto, (step.max_seq_len, step.head_dim))
    assert _matmuls_shaped(onnx.load(str(tmp_path / "p.onnx")), (step.max_seq_len, step.head_dim))
    # each layer's scores read the key cache through the product's transB (no Transpose copying the cache a step)
    fused = [n for n in _ort_optimized(path, tmp_path).graph.node if n.op_type == "FusedMatMul"]
    assert sum(a.name == "transB" and a.i == 1 for n in fused for a in n.attribute) == n_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    rep = compare(OnnxRunner(path), logits_fn_for(q), ids, gen_model=q, gen_prompt=ids[0, :6], new_tokens=16)
    check_parity(rep)  # max abs err within 1e-4 of the largest logit, prefill and KV-cache decode; greedy equal
    assert rep.sqnr_vs_eager_db > 100.0


def _native_model(non_expert: str, widths=(4, 3), symmetric=True):
    from moe_export.plan.bitplan import NonExpertPolicy

    model = tiny_random_model("MixtralForCausalLM")
    plan = mixed_plan(model, widths=widths)
    plan.quantizer.symmetric = symmetric
    plan.non_expert = NonExpertPolicy.parse(non_expert, 32).to_dict()
    return model, quantize_(copy.deepcopy(model), MoEQuantConfig(plan), progress=False)


def _float_tensors_shaped_like_experts(proto, model) -> list[str]:
    """Float tensors of the graph (initializers and inferred intermediates) whose last two dims are an expert
    projection's [N, K]: a dequantized expert, or a stack of them per cache position."""
    import onnx

    cfg = model.config
    h, i = cfg.hidden_size, getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
    expert_dims = {(2 * i, h), (h, i), (i, h)}
    inferred = onnx.shape_inference.infer_shapes(proto)
    bad = []
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and tuple(dims[-2:]) in expert_dims:
            bad.append(vi.name)
    for init in proto.graph.initializer:
        if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and tuple(init.dims[-2:]) in expert_dims:
            bad.append(init.name)
    return bad


def test_native_step_runs_on_onnxruntime_quantized_ops(tmp_path):
    """`mode="native"` with quantized attention, lm_head and embedding table: QMoE per width group,
    MatMulNBits for every packed linear, GatherBlockQuantized for the table; no float expert weight and no
    per-token stack of dequantized experts anywhere in the graph; exact path (accuracy level 0, 4-bit
    containers) within float rounding of the eager quantized model, 32 greedy tokens equal; the fast path
    (int8 activations) above an SQNR floor."""
    import onnx

    from moe_export.eval import logits_fn_for
    from moe_export.export.onnx import export_onnx, onnx_metadata, onnx_ops
    from moe_export.export.parity import check_parity, compare
    from moe_export.export.prepare import prepare_for_export, theoretical_size
    from moe_export.export.runners import OnnxRunner
    from moe_export.export.wrapper import DecoderStep

    model, q = _native_model("attention=4:32:sym,lm_head=4:32:sym,embeddings=4:32:sym")
    prepared = prepare_for_export(q)
    step = DecoderStep(prepared, 48)
    path = export_onnx(step, tmp_path / "exact.onnx", mode="native", accuracy_level=0)
    ops = onnx_ops(path)
    layers = model.config.num_hidden_layers
    assert ops["com.microsoft::QMoE"] == 2 * layers  # widths 4 and 3
    assert ops["com.microsoft::MatMulNBits"] == 4 * layers + 1  # q, k, v, o per layer + lm_head
    assert ops["com.microsoft::GatherBlockQuantized"] == 1
    proto = onnx.load(str(path))
    assert not _float_tensors_shaped_like_experts(proto, model)
    meta = onnx_metadata(path)
    assert meta["moe_export.note"] == "int3 experts as 4-bit QMoE codes" and meta["moe_export.accuracy_level"] == "0"
    assert path.stat().st_size < 1.35 * theoretical_size(prepared)["total"]  # the graph is a large share at H=64
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    eager = logits_fn_for(q)
    rep = compare(OnnxRunner(path), eager, ids, gen_model=q, gen_prompt=ids[0, :6], new_tokens=32)
    check_parity(rep)  # max abs err within 1e-4 of the largest logit, prefill and decode; greedy equal
    assert rep.greedy_match == rep.greedy_len == 32 and rep.sqnr_vs_eager_db > 100.0
    fast = compare(OnnxRunner(export_onnx(step, tmp_path / "fast.onnx", mode="native", accuracy_level=4)), eager, ids)
    assert 30.0 < fast.sqnr_vs_eager_db < 80.0  # int8 activations (measured 40-50 dB)


def test_packed_embedding_exports_in_every_onnx_mode(tmp_path):
    """A quantized embedding table (3-bit: in-graph unpack in packed mode; 4-bit container in native) exports
    and matches the eager quantized model; before, the table's subclass stopped the exporter (aten.__rshift__)."""
    from moe_export.eval import logits_fn_for
    from moe_export.export.onnx import export_onnx, onnx_metadata
    from moe_export.export.parity import check_parity, compare
    from moe_export.export.prepare import PackedEmbedding, prepare_for_export
    from moe_export.export.runners import OnnxRunner
    from moe_export.export.wrapper import DecoderStep

    model, q = _native_model("embeddings=3:32:sym", widths=(4,))
    prepared = prepare_for_export(q)
    assert isinstance(prepared.model.embed_tokens, PackedEmbedding)
    step = DecoderStep(prepared, 32)
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    for mode in ("packed", "native"):
        path = export_onnx(step, tmp_path / f"{mode}.onnx", mode=mode, accuracy_level=0)
        check_parity(compare(OnnxRunner(path), logits_fn_for(q), ids))
    assert onnx_metadata(path)["moe_export.note"] == "int3 embedding as 4-bit codes (GatherBlockQuantized)"


def _shared_expert_model(arch: str, widths):
    """A tiny Qwen2-MoE / DeepSeek-V3 with its shared experts (and Qwen2-MoE's sigmoid shared-expert gate, a
    router-role linear) packed at 4 bits, experts at ``widths``."""
    from moe_export.plan.bitplan import NonExpertPolicy

    model = tiny_random_model(arch, seed=0)
    plan = mixed_plan(model, widths=widths)
    plan.quantizer.symmetric = True
    plan.non_expert = NonExpertPolicy.parse("shared_experts=4:32:sym,router=4:32:sym", 32).to_dict()
    return model, quantize_(copy.deepcopy(model), MoEQuantConfig(plan), progress=False)


def _shared_expert_parity(arch: str, widths, tmp_path):
    """Native export of a shared-expert architecture at ``widths``: QMoE nodes for the routed experts, MatMulNBits
    for every shared-expert projection (and the sigmoid gate), nothing float of an expert's shape; the parity
    report against the eager quantized model (and the float model)."""
    import onnx

    from moe_export.eval import logits_fn_for
    from moe_export.export.onnx import export_onnx, onnx_ops
    from moe_export.export.parity import compare
    from moe_export.export.prepare import prepare_for_export
    from moe_export.export.runners import OnnxRunner
    from moe_export.export.wrapper import DecoderStep
    from moe_export.models import find_moe_layers

    model, q = _shared_expert_model(arch, widths)
    path = export_onnx(DecoderStep(prepare_for_export(q), 32), tmp_path / "m.onnx", mode="native", accuracy_level=0)
    ops = onnx_ops(path)
    blocks = [layer.block for layer in find_moe_layers(q)]
    assert ops["com.microsoft::QMoE"] == len(set(widths)) * len(blocks), ops
    proto = onnx.load(str(path))
    inits = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    nbits = sorted([a.i for a in n.attribute if a.name == "N"] for n in proto.graph.node if n.op_type == "MatMulNBits")
    shared = [getattr(b, "shared_expert", None) or b.shared_experts for b in blocks]
    want = [[m.gate_proj.out_features] for m in shared] + [[m.up_proj.out_features] for m in shared]
    want += [[m.down_proj.out_features] for m in shared]
    want += [[1] for b in blocks if hasattr(b, "shared_expert_gate")]  # Qwen2-MoE's sigmoid gate [1, H]
    assert nbits == sorted(want), (nbits, want)  # the shared experts' projections, nothing else
    assert all(len(dims) == 3 for name, dims in inits.items() if "fc1_w" in name or "fc2_w" in name)
    assert not _float_tensors_shaped_like_experts(proto, model)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    return compare(OnnxRunner(path), logits_fn_for(q), ids, float_logits_fn=logits_fn_for(model), gen_model=q,
                   gen_prompt=ids[0, :6], new_tokens=16)


@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_shared_expert_blocks_export_natively(arch, tmp_path):
    """Qwen2-MoE (a shared expert behind a sigmoid gate) and DeepSeek-V3 (shared experts, grouped sigmoid routing)
    in the native .onnx: the block's own router and shared experts traced as the model computes them, the
    shared projections on MatMulNBits beside the QMoE nodes. Exact path (4-bit containers): within float rounding
    of the eager quantized model (measured 1.8-2.4e-7 against logits of 0.6, 131-132 dB), 16 greedy tokens
    equal, and the same SQNR against the float model as the eager quantized model."""
    from moe_export.export.parity import check_parity

    rep = _shared_expert_parity(arch, (4, 3), tmp_path)
    check_parity(rep)
    assert rep.greedy_match == rep.greedy_len == 16 and rep.sqnr_vs_eager_db > 100.0
    assert abs(rep.sqnr_vs_float_db - rep.eager_sqnr_vs_float_db) < 0.01


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["Qwen2MoeForCausalLM", "DeepseekV3ForCausalLM"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_shared_expert_blocks_parity_per_width(arch, bits, tmp_path):
    """Every expert at one width: the 4-bit container (3, 4 bits) within float rounding of eager; the 2- and
    8-bit containers (LUT / int8-activation kernels) by SQNR, costing well under a dB of the plan's SQNR against
    the float model."""
    from moe_export.export.parity import APPROX_MIN_SQNR_DB, check_parity

    rep = _shared_expert_parity(arch, (bits,), tmp_path)
    if CONTAINER[bits] in APPROXIMATE_CONTAINERS:
        check_parity(rep, min_sqnr_db=APPROX_MIN_SQNR_DB)
        assert rep.sqnr_vs_float_db > rep.eager_sqnr_vs_float_db - 1.0
    else:
        check_parity(rep)
        assert rep.sqnr_vs_eager_db > 100.0 and abs(rep.sqnr_vs_float_db - rep.eager_sqnr_vs_float_db) < 0.01
    print(f"{arch} int{bits}: vs eager max abs {rep.max_abs_err_vs_eager:.3g} ({rep.sqnr_vs_eager_db:.1f} dB), "
          f"vs float {rep.sqnr_vs_float_db:.2f} dB (eager {rep.eager_sqnr_vs_float_db:.2f} dB)")
