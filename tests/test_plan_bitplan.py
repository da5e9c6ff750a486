"""BitPlan JSON: byte-for-byte round trip, one test per invalid case, validation against models."""

import json

import pytest
import torch

from moe_export.models import find_moe_layers
from moe_export.model_configs import tiny_random_model
from moe_export.plan.bitplan import (
    BITPLAN_VERSION,
    BitPlan,
    BitPlanError,
    LayerPlan,
    QuantizerSpec,
    router_sha256,
)


@pytest.fixture(scope="module")
def mixtral():
    return tiny_random_model("MixtralForCausalLM", seed=0)


def _plan(**over) -> BitPlan:
    kw = dict(
        model={"name": "tiny", "architecture": "MixtralForCausalLM", "router_sha256": ""},
        target_avg_bits=2.5,
        levels=[3, 2],
        quantizer=QuantizerSpec("rtn", 32, False),
        layers=[LayerPlan("model.layers.0.mlp", [3, 2, 3, 2, 3, 2, 3, 2], [64, 128]),
                LayerPlan("model.layers.1.mlp", [2, 2, 3, 3, 2, 2, 3, 3], [64, 128])],
        non_expert={"attention": "float", "shared_experts": {"bits": 8, "group_size": None, "symmetric": True}},
        provenance={"method": "router+maxvar", "zeta": 3.0, "scores": {"L_s": {"model.layers.0.mlp": [0.1, -2.5e-07, 3.0]}}},
    )
    kw.update(over)
    return BitPlan(**kw)


def _doc(**over) -> dict:
    d = json.loads(_plan().to_json())
    d.update(over)
    return d


def test_json_round_trip_is_byte_for_byte(tmp_path):
    text = _plan().to_json()
    again = BitPlan.from_json(text).to_json()
    assert again == text
    path = _plan().save(tmp_path / "plan.json")
    assert path.read_bytes() == text.encode()
    assert BitPlan.load(path).to_json() == text
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # atomic write leaves no temp file
    d = json.loads(text)
    assert list(d) == ["format", "version", "model", "target_avg_bits", "levels", "quantizer", "layers",
                       "non_expert", "provenance"]
    assert d["version"] == BITPLAN_VERSION
    assert d["layers"][0] == {"name": "model.layers.0.mlp", "num_experts": 8, "bits": [3, 2, 3, 2, 3, 2, 3, 2],
                              "in_dims": [64, 128]}
    # one layer per line: readable and diff-friendly
    assert '{"name": "model.layers.1.mlp", "num_experts": 8, "bits": [2, 2, 3, 3, 2, 2, 3, 3]' in text
    # missing non-expert roles are filled with "float" in the canonical order
    assert list(d["non_expert"]) == ["attention", "router", "shared_experts", "embeddings", "lm_head", "dense_mlp"]


def test_provenance_keys_are_sorted_so_equal_plans_serialise_equally():
    a = _plan(provenance={"method": "x", "zeta": 3.0})
    b = _plan(provenance={"zeta": 3.0, "method": "x"})
    assert a.to_json() == b.to_json()


def test_bits_for_and_counts():
    p = _plan()
    assert p.bits_for("model.layers.1.mlp") == [2, 2, 3, 3, 2, 2, 3, 3]
    assert p.counts() == [{3: 4, 2: 4}, {3: 4, 2: 4}]
    with pytest.raises(BitPlanError, match="no layer 'nope'"):
        p.bits_for("nope")


# ---- one test per invalid case -------------------------------------------------------------------


def test_error_unknown_version():
    with pytest.raises(BitPlanError, match="unsupported bit plan version 3"):
        BitPlan.from_json(json.dumps(_doc(version=3)))


def test_error_unknown_format():
    with pytest.raises(BitPlanError, match="not a bit plan: format"):
        BitPlan.from_json(json.dumps(_doc(format="something.else")))


def test_error_not_json(tmp_path):
    bad = tmp_path / "plan.json"
    bad.write_text("{ truncated")
    with pytest.raises(BitPlanError, match=r"plan.json: not valid JSON"):
        BitPlan.load(bad)
    with pytest.raises(BitPlanError, match="no such bit plan file"):
        BitPlan.load(tmp_path / "missing.json")


@pytest.mark.parametrize("b", [0, 9, -1])
def test_error_bits_outside_1_8(b):
    d = _doc()
    d["layers"][0]["bits"][0] = b
    d["levels"] = [3, 2, b]
    with pytest.raises(BitPlanError, match=f"{b} bits is outside 1-8"):
        BitPlan.from_dict(d)


def test_error_bits_not_among_levels():
    d = _doc()
    d["layers"][0]["bits"][:2] = [4, 1]  # mean unchanged
    with pytest.raises(BitPlanError, match="4 bits is not one of the plan's levels"):
        BitPlan.from_dict(d)


def test_error_mean_differs_from_target():
    with pytest.raises(BitPlanError, match="mean expert bits 2.5 differs from the declared target_avg_bits 2.25"):
        BitPlan.from_json(json.dumps(_doc(target_avg_bits=2.25)))


def test_error_group_size_does_not_divide_dim():
    d = _doc()
    d["quantizer"]["group_size"] = 48
    with pytest.raises(BitPlanError, match="group size 48 does not divide the expert input dim 64"):
        BitPlan.from_dict(d)


def test_error_num_experts_disagrees_with_bits():
    d = _doc()
    d["layers"][1]["num_experts"] = 4
    with pytest.raises(BitPlanError, match="num_experts is 4 but bits lists 8 experts"):
        BitPlan.from_dict(d)


def test_error_unknown_non_expert_role():
    d = _doc()
    d["non_expert"]["vision_tower"] = "float"
    with pytest.raises(BitPlanError, match=r"unknown role\(s\) \['vision_tower'\]"):
        BitPlan.from_dict(d)


def test_error_missing_field_and_duplicate_layer():
    d = _doc()
    del d["layers"]
    with pytest.raises(BitPlanError, match=r"missing field\(s\) \['layers'\]"):
        BitPlan.from_dict(d)
    d = _doc()
    d["layers"][1]["name"] = d["layers"][0]["name"]
    with pytest.raises(BitPlanError, match="lists layer 'model.layers.0.mlp' twice"):
        BitPlan.from_dict(d)


def test_error_layer_count_mismatch_with_model(mixtral):
    p = _plan(layers=[LayerPlan("model.layers.0.mlp", [3, 2] * 4)])
    with pytest.raises(BitPlanError, match=r"plan-only \[\], model-only \['model.layers.1.mlp'\]"):
        p.validate_against(mixtral)


def test_error_expert_count_mismatch_with_model(mixtral):
    p = _plan(layers=[LayerPlan("model.layers.0.mlp", [3, 2] * 2), LayerPlan("model.layers.1.mlp", [3, 2] * 2)])
    with pytest.raises(BitPlanError, match="plan has 4 experts, model has 8"):
        p.validate_against(mixtral)


def test_error_group_size_against_model(mixtral):
    # no in_dims recorded: the model's dims catch it (intermediate 128 is fine, hidden 64 is not)
    layers = [LayerPlan(l.name, [3, 2] * 4) for l in find_moe_layers(mixtral)]
    p = _plan(layers=layers, quantizer=QuantizerSpec("rtn", 128, False))
    with pytest.raises(BitPlanError, match="group size 128 does not divide the expert input dim 64"):
        p.validate_against(mixtral)


def test_error_router_hash_mismatch(mixtral):
    plan = BitPlan.uniform(find_moe_layers(mixtral), 3, group_size=32, model_name="tiny")
    plan.validate_against(mixtral)
    other = tiny_random_model("MixtralForCausalLM", seed=1)
    with pytest.raises(BitPlanError, match="made for another checkpoint"):
        plan.validate_against(other)
    plan.validate_against(other, check_router=False)


# ---- constructors and views ---------------------------------------------------------------------


def test_uniform_plan_matches_model(mixtral):
    layers = find_moe_layers(mixtral)
    plan = BitPlan.uniform(layers, 4, group_size=64, symmetric=True, model_name="tiny", architecture="MixtralForCausalLM")
    assert plan.layer_names == [l.name for l in layers]
    assert all(l.bits == [4] * 8 for l in plan.layers)
    assert plan.target_avg_bits == 4.0 and plan.levels == [4] and plan.quantizer.symmetric
    assert plan.model["router_sha256"] == router_sha256([l.router_weight for l in layers])
    plan.validate_against(layers)
    assert BitPlan.from_json(plan.to_json()).to_json() == plan.to_json()


def test_router_hash_is_dtype_stable_for_exact_upcasts():
    w = torch.randn(8, 64).to(torch.bfloat16)
    assert router_sha256([w]) == router_sha256([w.float()])
    assert router_sha256([w]) != router_sha256([w.float() + 1e-3])
    assert router_sha256([w, w]) != router_sha256([w])


def test_validate_against_checkpoint_folder(tmp_path, mixtral):
    mixtral.save_pretrained(tmp_path)
    plan = BitPlan.uniform(find_moe_layers(mixtral), 2, group_size=32)
    plan.validate_against(tmp_path)  # router hash from the safetensors equals the model's


def test_summary_and_heatmap(tmp_path):
    from moe_export.plan.heatmap import save_heatmap

    p = _plan()
    s = p.summary()
    assert "3-bit  2-bit" in s and "model.layers.0.mlp      4      4  2.500  32323232" in s
    assert "mean 2.5 bits/expert (target 2.5)" in s
    save_heatmap(p, tmp_path / "plan.png")
    data = (tmp_path / "plan.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
