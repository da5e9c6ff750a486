"""Speed export modes: ONNX ``fast`` (MatMulNBits experts) and ExecuTorch ``xnnpack-int`` (int4-exact experts
on XNNPACK). Measured on the tiny zoo model with ZOO_BITS (1 thread): onnx fast at accuracy_level 4 is 46.6 dB
SQNR vs eager (int8 activations), 133 dB at accuracy_level 0; xnnpack-int 49.6 dB; 32/32 greedy tokens for all.
The SQNR floor for int8-activation modes is parity.APPROX_MIN_SQNR_DB = 30 dB; a wrong lowering is far below.
"""

import copy
import json

import pytest
import torch

from moe_export.export.executorch import export_pte, pte_ops
from moe_export.export.fast import (
    NBitsLinear, int4_codes, int4_linear, to_nbits_experts, to_xnnpack_int_experts,
)
from moe_export.export.onnx import export_onnx, onnx_metadata, onnx_ops
from moe_export.eval import logits_fn_for
from moe_export.export.parity import APPROX_MIN_SQNR_DB, ParityError, check_parity, compare
from moe_export.export.prepare import prepare_for_export, theoretical_size
from moe_export.export.runners import OnnxRunner, PteRunner
from moe_export.export.wrapper import DecoderStep
from moe_export.model_configs import tiny_random_model
from test_export_targets import ZOO_BITS, _quantize


def _packed_experts(prepared):
    from moe_export.export.experts import PackedMixedExperts

    return [m for m in prepared.modules() if isinstance(m, PackedMixedExperts)]


@pytest.fixture(scope="module")
def zoo_fast(tiny_zoo_dir, tmp_path_factory):
    from moe_export.loading import load_float_model

    fmodel = load_float_model(tiny_zoo_dir / "finetuned")
    qmodel, _ = _quantize(fmodel, ZOO_BITS)
    prepared = prepare_for_export(qmodel)
    out = tmp_path_factory.mktemp("zoo_fast")
    step = DecoderStep(prepared, max_seq_len=64)
    onnx_path = export_onnx(step, out / "model-fast.onnx", mode="fast", accuracy_level=4)
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    return dict(f=fmodel, q=qmodel, prepared=prepared, step=step, onnx=onnx_path, ids=ids, out=out)


def test_nbits_linear_matches_stored_expert(zoo_fast):
    """The eager form of every MatMulNBits projection (3-bit in a 4-bit container included) equals the
    stored expert bit for bit."""
    for ex in _packed_experts(zoo_fast["prepared"]):
        for w in (ex.gate_up_proj, ex.down_proj):
            x = torch.randn(3, w.k)
            for e in range(w.num_experts):
                ref = w.width_groups().dequantize_expert(e)
                lin = NBitsLinear(*_qparams(w, e), w.k, 4)
                assert lin.bits == {2: 2, 3: 4, 4: 4, 8: 8}[w.expert_bits[e]]
                assert torch.equal(lin(x), torch.nn.functional.linear(x, ref))


def _nodes(graph):  # every node, If branches included
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.g is not None and a.g.node:
                yield from _nodes(a.g)


def _qparams(w, e):
    from moe_export.export.fast import _expert_qparams

    p, s, z, b = _expert_qparams(w, e)
    return p, s, z, b


def test_int4_codes_exact_and_selective(zoo_fast):
    """1-3 bit experts fit symmetric int4 (codes = q - zero exactly, torchao's own quantize_affine agrees);
    8-bit experts do not."""
    for ex in _packed_experts(zoo_fast["prepared"]):
        w = ex.gate_up_proj
        for e in range(w.num_experts):
            p, s, z, b = _qparams(w, e)
            codes = int4_codes(p, s, z, b, w.k)
            if b <= 3:
                assert codes is not None and codes.abs().max() <= 7
                lin = int4_linear(p, s, z, b, w.k)  # raises if torchao's codes differ from q - zero
                assert torch.equal(lin.weight.qdata, codes)
                assert torch.equal(lin.weight.dequantize(), w.width_groups().dequantize_expert(e))
            elif b == 8:
                assert codes is None and int4_linear(p, s, z, b, w.k) is None


def test_onnx_fast_graph_parity_size(zoo_fast):
    import onnx

    proto = onnx.load(str(zoo_fast["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    ops = onnx_ops(proto)
    assert ops["com.microsoft::MatMulNBits"] == 2 * 8 * 2  # layers x experts x (gate_up, down)
    assert ops["If"] == 2 * 8  # one per expert: unrouted experts are skipped
    assert "com.microsoft::GatherBlockQuantized" not in ops and "Mod" not in ops  # no in-graph unpack left
    meta = onnx_metadata(proto)
    assert meta["moe_export.onnx_mode"] == "fast" and meta["moe_export.accuracy_level"] == "4"
    assert json.loads(meta["moe_export.containers"]) == {"2": 2, "3": 4, "4": 4, "8": 8}
    assert "int3 experts stored as 4-bit" in meta["moe_export.note"]
    attrs = {a.name: a.i for n in _nodes(proto.graph) if n.op_type == "MatMulNBits" for a in n.attribute}
    assert attrs["accuracy_level"] == 4 and attrs["block_size"] == 32
    # 3-bit experts at 4 bits a weight: above the packed theoretical size, measured +3.1% on this model
    theory = theoretical_size(zoo_fast["prepared"])["total"]
    assert theory <= zoo_fast["onnx"].stat().st_size <= 1.25 * theory

    rep = compare(OnnxRunner(zoo_fast["onnx"]), logits_fn_for(zoo_fast["q"]), zoo_fast["ids"], logits_fn_for(zoo_fast["f"]),
                  gen_model=zoo_fast["q"], gen_prompt=zoo_fast["ids"][0, :8], new_tokens=32)
    check_parity(rep, min_sqnr_db=APPROX_MIN_SQNR_DB)
    assert rep.sqnr_vs_eager_db > 40.0  # measured 46.6 dB: int8 activations, not exact
    assert rep.max_abs_err_vs_eager > 1e-5 * rep.logit_scale  # really the int8 path, not float compute
    assert abs(rep.sqnr_vs_float_db - rep.eager_sqnr_vs_float_db) < 0.5  # measured 0.05 dB
    with pytest.raises(ParityError):
        check_parity(rep)  # the tight rule of exact modes rejects int8 activation arithmetic


def _small_qwen():
    fmodel = tiny_random_model("Qwen3MoeForCausalLM", seed=0, num_hidden_layers=1).eval()
    qmodel, _ = _quantize(fmodel, [[2, 3, 3, 4, 8, 3, 2, 3]])
    step = DecoderStep(prepare_for_export(qmodel), max_seq_len=32)
    return qmodel, step, torch.randint(0, fmodel.config.vocab_size, (1, 10))


@pytest.mark.slow
def test_onnx_fast_accuracy0_is_exact(tmp_path):
    qmodel, step, ids = _small_qwen()
    rep = compare(OnnxRunner(export_onnx(step, tmp_path / "a0.onnx", mode="fast", accuracy_level=0)), logits_fn_for(qmodel), ids)
    check_parity(rep)  # float compute: within the tight 1e-4 relative rule (measured 133 dB on the zoo model)
    assert rep.sqnr_vs_eager_db > 100


def test_onnx_fast_wrong_lowering_fails(tmp_path, monkeypatch):
    qmodel, step, ids = _small_qwen()
    # A lowering that drops the zero points (MatMulNBits then assumes 2**(b-1)) must fail the SQNR floor.
    orig = NBitsLinear.__init__

    def no_zero(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        self.zero = None

    monkeypatch.setattr(NBitsLinear, "__init__", no_zero)
    bad = compare(OnnxRunner(export_onnx(step, tmp_path / "bad.onnx", mode="fast", accuracy_level=4)), logits_fn_for(qmodel), ids)
    assert bad.sqnr_vs_eager_db < APPROX_MIN_SQNR_DB
    with pytest.raises(ParityError, match="SQNR"):
        check_parity(bad, min_sqnr_db=APPROX_MIN_SQNR_DB)


def test_xnnpack_int_split_counts(zoo_fast):
    _, counts = to_xnnpack_int_experts(zoo_fast["step"])
    # ZOO_BITS: per layer one 8-bit and one 4-bit expert (4-bit asymmetric codes reach +-15: not int4-exact)
    assert counts["int4"] + counts["float"] == 2 * 8 * 3
    assert counts["int4"] >= 2 * 6 * 3 and counts["float"] >= 2 * 1 * 3


def test_fast_modes_need_packed_experts():
    fmodel = tiny_random_model("MixtralForCausalLM", seed=0, num_hidden_layers=1).eval()
    with pytest.raises(ValueError, match="packed mixed-width experts"):
        to_nbits_experts(prepare_for_export(fmodel))
    with pytest.raises(ValueError, match="unknown onnx mode"):
        export_onnx(fmodel, "x.onnx", mode="turbo")


@pytest.mark.slow
def test_xnnpack_int_pte_zoo(zoo_fast):
    pte = export_pte(zoo_fast["step"], zoo_fast["out"] / "model-xnnpack-int.pte", mode="xnnpack-int")
    ops = pte_ops(pte)
    assert ops.get("XnnpackBackend", 0) > 0
    rep = compare(PteRunner(pte), logits_fn_for(zoo_fast["q"]), zoo_fast["ids"], logits_fn_for(zoo_fast["f"]),
                  gen_model=zoo_fast["q"], gen_prompt=zoo_fast["ids"][0, :8], new_tokens=32)
    check_parity(rep, min_sqnr_db=APPROX_MIN_SQNR_DB)
    assert rep.sqnr_vs_eager_db > 40.0  # measured 49.6 dB
    assert rep.greedy_match == 32


def test_cli_rejects_unknown_modes(tmp_path):
    from click.testing import CliRunner

    from moe_export.cli import main

    for flag, bad in (("--onnx-mode", "turbo"), ("--pte-mode", "xnnpack-int4")):
        res = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "o"), flag, f"packed,{bad}"])
        assert res.exit_code != 0 and bad in res.output and "fast" in res.output and "xnnpack-int" in res.output


@pytest.mark.slow
def test_onnx_fast_hqq_float_zero_points(tmp_path):
    """Fractional (HQQ) zeros: float zero points for 1-4 bit MatMulNBits (measured 138 dB vs eager at
    accuracy_level 0); 8-bit with float zeros has no ORT kernel and becomes an exact float projection."""
    from _packed_experts import quantize_experts_

    fmodel = tiny_random_model("MixtralForCausalLM", seed=0, num_hidden_layers=1).eval()
    qmodel = quantize_experts_(copy.deepcopy(fmodel), [2, 3, 4, 8, 1, 3, 2, 4], group_size=32, quantizer="hqq")
    step = DecoderStep(qmodel, 32)
    path = export_onnx(step, tmp_path / "hqq.onnx", mode="fast", accuracy_level=0)
    meta = onnx_metadata(path)
    assert meta["moe_export.float_expert_projections"] == "2"  # the 8-bit expert's gate_up and down
    assert json.loads(meta["moe_export.containers"]) == {"1": 2, "2": 2, "3": 4, "4": 4}
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 10))
    rep = compare(OnnxRunner(path), logits_fn_for(qmodel), ids)
    check_parity(rep)
    assert rep.sqnr_vs_eager_db > 100
