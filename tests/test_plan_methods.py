"""End to end: make_plan for every --method, streaming from safetensors, zoo reference default, CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from moe_export.io import SafetensorsCheckpoint
from moe_export.model_configs import TINY_ARCHITECTURES, tiny_random_model
from moe_export.models import find_moe_layers
from moe_export.plan.allocation import AllocationError
from moe_export.plan.bitplan import BitPlan
from moe_export.plan.methods import METHODS, PlanConfig, PlanError, make_plan

G = 32  # tiny models: hidden 64, expert intermediate 128


def _finetune(model, factors, wide_expert=None):
    """Scale router rows of every MoE layer by ``factors`` (known L_s order); give one expert a wide gate row."""
    for l in find_moe_layers(model):
        with torch.no_grad():
            l.router_weight.mul_(torch.tensor(factors)[:, None])
            if wide_expert is not None:
                l.expert(wide_expert).first[0].mul_(40.0)  # one neuron's variance x1600: MaxVar outlier
    return model


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """A zoo-style build folder: pretrained/ and finetuned/ (routers rescaled, expert 7 with a MaxVar outlier)."""
    root = tmp_path_factory.mktemp("zoo")
    pre = tiny_random_model("MixtralForCausalLM", seed=0)
    pre.save_pretrained(root / "pretrained")
    # L_s grows with expert id for rows whose norms are similar: factors well apart dominate
    ft = _finetune(tiny_random_model("MixtralForCausalLM", seed=0), [0.5, 0.6, 0.7, 0.8, 1.2, 1.4, 1.6, 1.8], wide_expert=7)
    ft.save_pretrained(root / "finetuned")
    return root, pre, ft


def test_router_plan_follows_L_s_and_zoo_reference_default(zoo):
    root, pre, ft = zoo
    plan = make_plan(root, PlanConfig(2.5, [3, 2], method="router", group_size=G), progress=False)
    assert plan.provenance["reference"].endswith("pretrained")
    for l in plan.layers:
        L = torch.tensor(plan.provenance["scores"]["L_s"][l.name])
        assert torch.all(L[:4] < 0) and torch.all(L[4:] > 0)  # shrunk rows negative: signed change
        assert l.bits == [3, 3, 3, 3, 2, 2, 2, 2]  # smallest L_s -> most bits
    plan.validate_against(ft)
    with pytest.raises(Exception, match="another checkpoint"):
        plan.validate_against(pre)


def test_router_maxvar_promotes_the_outlier(zoo):
    root, _, ft = zoo
    plan = make_plan(root, PlanConfig(2.5, [3, 2], group_size=G), progress=False)
    assert plan.provenance["method"] == "router+maxvar" and plan.provenance["zeta"] == 3.0
    for l in plan.layers:
        assert plan.provenance["scores"]["ranking"][l.name][0] == 7
        assert l.bits == [3, 3, 3, 2, 2, 2, 2, 3]
    # same plan from the in-memory model (reference model in memory too), same router hash
    mem = make_plan(ft, PlanConfig(2.5, [3, 2], group_size=G), reference=tiny_random_model("MixtralForCausalLM", seed=0),
                    progress=False)
    assert [l.bits for l in mem.layers] == [l.bits for l in plan.layers]
    assert mem.model["router_sha256"] == plan.model["router_sha256"]


def test_maxvar_only_ranking_both_directions(zoo):
    root, _, _ = zoo
    desc = make_plan(root, PlanConfig(2.25, [3, 2], method="maxvar", group_size=G), progress=False)
    asc = make_plan(root, PlanConfig(2.25, [3, 2], method="maxvar", maxvar_order="ascending", group_size=G), progress=False)
    for d, a in zip(desc.layers, asc.layers):
        var = torch.tensor(desc.provenance["scores"]["maxvar"][d.name])
        assert int(var.argmax()) == 7
        assert d.bits[7] == 3 and a.bits[7] == 2  # 2.25 bits: two experts at 3 bits
        assert sorted(e for e, b in enumerate(d.bits) if b == 3) == sorted(torch.argsort(var, descending=True)[:2].tolist())
        assert sorted(e for e, b in enumerate(a.bits) if b == 3) == sorted(torch.argsort(var)[:2].tolist())
    assert asc.provenance["maxvar_order"] == "ascending"


def test_final_norm_proxy_without_reference(zoo):
    root, _, ft = zoo
    plan = make_plan(root / "finetuned", PlanConfig(2.5, [3, 2], method="router", group_size=G), progress=False)
    assert plan.provenance["reference"] == "none (final-norm proxy)"
    for l in find_moe_layers(ft):
        norms = torch.linalg.vector_norm(l.router_weight.double(), dim=1)
        assert plan.provenance["scores"]["L_s"][l.name] == pytest.approx(norms.tolist(), rel=1e-5)


def test_streaming_reads_only_routers_and_first_layer_weights(zoo, monkeypatch):
    root, _, _ = zoo
    from moe_export.plan.reader import StreamReader

    read = []  # tensor data reads (the layout itself reads only headers)
    orig_read = StreamReader.read

    def logged(self, key, *a, **k):
        read.append(key)
        return orig_read(self, key, *a, **k)

    monkeypatch.setattr(StreamReader, "read", logged)
    monkeypatch.setattr(SafetensorsCheckpoint, "get", lambda self, key: pytest.fail(f"mmap read of {key}"))
    make_plan(root, PlanConfig(2.5, [3, 2], group_size=G), progress=False)
    tensor_keys = {k for k in read}
    assert tensor_keys, "nothing was read"
    assert all(k.endswith(".gate.weight") or ".w1." in k for k in tensor_keys), sorted(tensor_keys)
    assert any(".w1." in k for k in tensor_keys) and not any(".w2." in k or ".w3." in k for k in tensor_keys)
    read.clear()
    make_plan(root, PlanConfig(2.5, [3, 2], method="router", group_size=G), progress=False)
    assert read and all(k.endswith(".gate.weight") for k in read)  # router alone reads routers only


def test_weight_error_from_checkpoint_equals_in_memory(zoo):
    root, _, ft = zoo
    cfg = PlanConfig(2.0, [3, 2, 1], method="weight-error", group_size=G)
    disk = make_plan(root / "finetuned", cfg, progress=False)
    mem = make_plan(ft, cfg, progress=False)
    assert [l.bits for l in disk.layers] == [l.bits for l in mem.layers]
    assert disk.provenance["scores"]["weight_error"] == mem.provenance["scores"]["weight_error"]
    for l in disk.layers:
        assert sum(l.bits) == 16 and l.bits[7] == 3  # the wide expert has the largest error at every width
    weighted = make_plan(root, PlanConfig(2.0, [3, 2, 1], method="weight-error", group_size=G, router_weighting=5.0),
                         progress=False)
    assert "L_s" in weighted.provenance["scores"] and weighted.provenance["router_weighting"] == 5.0


def _calib():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 500, (4, 32), generator=g) for _ in range(2)]


@pytest.mark.parametrize("method", ["frequency", "routing-weight", "pmq"])
def test_calibrated_methods(zoo, method):
    _, _, ft = zoo
    plan = make_plan(ft, PlanConfig(2.25, [3, 2, 1], method=method, group_size=G, pmq_tokens=32), batches=_calib(),
                     progress=False)
    plan.validate_against(ft)
    assert plan.mean_bits() == 2.25 and plan.provenance["calibration_tokens"] == 256
    sc = plan.provenance["scores"]
    for l in plan.layers:
        freq = torch.tensor(sc["frequency"][l.name])
        assert freq.sum().item() == pytest.approx(2.0, abs=1e-4)  # top-2
        if method == "frequency":
            top = torch.sort(-freq, stable=True).indices[:4].tolist()  # 2.25 bits on 3/2/1: 4 x 3-bit
            assert sorted(e for e, b in enumerate(l.bits) if b == 3) == sorted(top)
        if method == "pmq":
            assert 3 in l.bits and 2 in l.bits  # MC-MoE's at-least-one constraint
            err = torch.tensor(sc["output_error"][l.name])  # [E, 3]
            assert torch.all(err[:, 0] <= err[:, 1]) and torch.all(err[:, 1] <= err[:, 2])


def test_calibrated_method_needs_model_and_batches(zoo):
    root, _, ft = zoo
    with pytest.raises(PlanError, match="needs a calibration pass"):
        make_plan(root, PlanConfig(2.5, [3, 2], method="pmq", group_size=G), progress=False)
    with pytest.raises(PlanError, match="needs calibration batches"):
        make_plan(ft, PlanConfig(2.5, [3, 2], method="frequency", group_size=G), progress=False)


def test_random_and_uniform(zoo):
    root, _, _ = zoo
    a = make_plan(root, PlanConfig(2.5, [3, 2], method="random", seed=1, group_size=G), progress=False)
    b = make_plan(root, PlanConfig(2.5, [3, 2], method="random", seed=1, group_size=G), progress=False)
    c = make_plan(root, PlanConfig(2.5, [3, 2], method="random", seed=2, group_size=G), progress=False)
    assert a.to_json() == b.to_json() and [l.bits for l in a.layers] != [l.bits for l in c.layers]
    u = make_plan(root, PlanConfig(3, [3], method="uniform", group_size=G), progress=False)
    assert all(l.bits == [3] * 8 for l in u.layers)
    with pytest.raises(PlanError, match="must be one of the levels"):
        PlanConfig(2.5, [3, 2], method="uniform")


def test_bad_config_and_unreachable(zoo):
    root, _, _ = zoo
    with pytest.raises(PlanError, match="unknown method 'hessian'"):
        PlanConfig(2.5, [3, 2], method="hessian")
    with pytest.raises(AllocationError, match="not reachable"):
        make_plan(root, PlanConfig(2.1, [3, 2], group_size=G), progress=False)
    with pytest.raises(Exception, match="group size 48 does not divide"):
        make_plan(root, PlanConfig(2.5, [3, 2], group_size=48), progress=False)


def _permute_experts(model, perm):
    """New expert i = old expert perm[i], in router rows and expert weights of every MoE layer."""
    for l in find_moe_layers(model):
        with torch.no_grad():
            l.router_weight.copy_(l.router_weight[perm].clone())
            l.experts.gate_up_proj.copy_(l.experts.gate_up_proj[perm].clone())
            l.experts.down_proj.copy_(l.experts.down_proj[perm].clone())
    return model


@pytest.mark.parametrize("method", ["router+maxvar", "weight-error", "maxvar"])
def test_relabelling_experts_relabels_the_plan(method):
    perm = [3, 7, 0, 5, 1, 6, 2, 4]
    ref = tiny_random_model("MixtralForCausalLM", seed=0)
    ft = _finetune(tiny_random_model("MixtralForCausalLM", seed=0), [0.5, 1.3, 0.7, 1.8, 1.2, 0.6, 1.6, 0.8], wide_expert=5)
    cfg = PlanConfig(2.25, [3, 2, 1], method=method, group_size=G)
    plan = make_plan(ft, cfg, reference=ref, progress=False)
    plan_p = make_plan(_permute_experts(ft, perm), cfg, reference=_permute_experts(ref, perm), progress=False)
    for l, lp in zip(plan.layers, plan_p.layers):
        assert lp.bits == [l.bits[p] for p in perm]


@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_every_architecture_plans_and_validates(arch):
    model = tiny_random_model(arch, seed=0)
    plan = make_plan(model, PlanConfig(2.5, [3, 2], group_size=G), progress=False)
    assert plan.layer_names == [l.name for l in find_moe_layers(model)]
    assert plan.model["architecture"] == arch
    plan.validate_against(model)
    assert BitPlan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_methods_tuple_matches_cli_and_recipes():
    from moe_export.commands.plan import METHOD_CHOICES
    from moe_export.recipes import KNOWN_METHODS

    assert set(METHODS) == set(METHOD_CHOICES) == set(KNOWN_METHODS)


def test_cli_plan_writes_json_summary_and_heatmap(zoo, tmp_path):
    from moe_export.cli import main

    root, _, ft = zoo
    out, png = tmp_path / "plan.json", tmp_path / "plan.png"
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.5", "--levels", "3,2", "--group-size", "32",
                                  "-o", str(out), "--heatmap", str(png), "-q"])
    assert r.exit_code == 0, r.output
    plan = BitPlan.load(out)
    assert plan.provenance["method"] == "router+maxvar" and plan.provenance["reference"].endswith("pretrained")
    assert [l.bits for l in plan.layers] == [[3, 3, 3, 2, 2, 2, 2, 3]] * 2
    assert png.read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.0", "--levels", "3,2,1", "--group-size", "32",
                                  "--method", "weight-error", "--non-expert", "attention=4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "1-bit" in r.output and "wrote" in r.output
    d = json.loads(out.read_text())
    assert d["levels"] == [3, 2, 1]
    assert d["non_expert"]["attention"] == {"bits": 4, "group_size": 32, "symmetric": False}
    assert d["non_expert"]["router"] == "float"


def test_cli_errors_are_one_line(zoo, tmp_path):
    from moe_export.cli import main

    root, _, _ = zoo
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.1", "--group-size", "32", "-o", str(out), "-q"])
    assert r.exit_code == 1 and "not reachable" in r.output and "Traceback" not in r.output
    assert not out.exists()
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.5", "--levels", "3,x", "-o", str(out)])
    assert r.exit_code == 2 and "comma-separated" in r.output
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.5", "--non-expert", "vision=4", "-o", str(out)])
    assert r.exit_code == 2 and "ROLE=float" in r.output
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.5", "--group-size", "128", "-o", str(out),
                                  "-q"])  # group 128 vs hidden 64
    assert r.exit_code == 1 and "group size 128 does not divide" in r.output


@pytest.mark.slow
def test_cli_calibrated_method_loads_model_and_corpus(zoo, tmp_path):
    """--method pmq through the CLI: loads finetuned/ with its tokenizer and calibrates on a local corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from moe_export.cli import main

    root, _, _ = zoo
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root / "finetuned")
    out = tmp_path / "pmq.json"
    r = CliRunner().invoke(main, ["plan", str(root), "--avg-bits", "2.0", "--levels", "3,2,1", "--group-size", "32",
                                  "--method", "pmq", "--calib-tokens", "1024", "--calib-seq-len", "64", "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    plan = BitPlan.load(out)
    assert plan.provenance["calibration_tokens"] == 1024 and "shakespeare" in plan.provenance["calibration"]
    assert all(3 in l.bits and 2 in l.bits and sum(l.bits) == 16 for l in plan.layers)


def test_non_finite_avg_bits_or_zeta_is_a_plan_error():
    # found by test_fuzz_cli_arguments: `plan --avg-bits nan` reached Fraction('nan') and raised a traceback
    for kw in ({"avg_bits": float("nan")}, {"avg_bits": float("inf")}, {"avg_bits": 2.5, "zeta": float("nan")}):
        with pytest.raises(PlanError, match="finite"):
            PlanConfig(levels=[3, 2], **kw)
