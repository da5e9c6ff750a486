"""quantize_(model, MoEQuantConfig(plan)): widths, non-expert policy, memory, errors."""

import pytest
import torch

from moe_export import MoEQuantConfig, quantize_
from moe_export.quant.apply import install_quantized_layer, quantize_layer_experts
from moe_export.model_configs import tiny_random_model
from moe_export.models import find_moe_layers
from moe_export.plan.bitplan import BitPlan, BitPlanError
from moe_export.quant.rtn import RTNQuantizer
from moe_export.size import expert_bytes, theoretical_expert_bytes
from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight
from tests._mixed_plans import mixed_plan

ARCHS = ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "SwitchTransformersForConditionalGeneration"]


def _logits(model, ids):
    kw = {"decoder_input_ids": ids} if "Switch" in type(model).__name__ else {}
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_quantize_applies_each_experts_width_and_matches_dequantized_reference(arch):
    model = tiny_random_model(arch)
    ref = tiny_random_model(arch)  # same seed, same weights
    plan = mixed_plan(model, widths=(3, 2, 4, 2, 8, 1))
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    float_logits = _logits(model, ids)
    quantize_(model, MoEQuantConfig(plan), progress=False)

    # reference: the float model with its expert weights replaced by plain-torch dequantized RTN weights
    rtn = RTNQuantizer()
    for layer, ref_layer in zip(find_moe_layers(model), find_moe_layers(ref)):
        bits = plan.bits_for(layer.name)
        for proj in layer.projections:
            p = getattr(layer.experts, proj) if layer.fused else None
            if layer.fused:
                assert isinstance(p, MixedWidthExpertsTensor) and list(p.bit_widths) == bits
            for e, b in enumerate(bits):
                w = ref_layer.expert_weight(proj, e)
                if not layer.fused:
                    assert isinstance(getattr(layer.experts[f"expert_{e}"], proj).weight, PackedLinearWeight)
                with torch.no_grad():
                    w.copy_(rtn.quantize(w, b, 32, False).dequantize())
    got, want = _logits(model, ids), _logits(ref, ids)
    err = (got - want).abs().max().item()
    assert err < 1e-4 * want.abs().max().item(), f"{arch}: max abs err vs dequantized reference {err:.3g}"
    # quantization did something: measured logits SQNR vs float 10-30 dB for these widths on random weights
    sqnr = 10 * torch.log10(float_logits.pow(2).mean() / (float_logits - got).pow(2).mean()).item()
    assert 5 < sqnr < 60, f"{arch}: logits SQNR vs float {sqnr:.1f} dB"


@pytest.mark.parametrize("arch", ARCHS)
def test_experts_held_in_memory_within_3_percent_of_theoretical(arch):
    model = tiny_random_model(arch)
    plan = mixed_plan(model, widths=(3, 2))
    float_bytes = expert_bytes(model)
    quantize_(model, MoEQuantConfig(plan), progress=False)
    held, theory = expert_bytes(model), theoretical_expert_bytes(model, plan)
    assert abs(held / theory - 1) < 0.03, f"{arch}: experts hold {held} B, theoretical {theory:.0f} B"
    assert held < float_bytes / 8, f"{arch}: {held} B is not packed (float {float_bytes} B)"


def test_non_expert_policy_quantizes_the_named_roles_and_keeps_ties():
    model = tiny_random_model("MixtralForCausalLM")
    plan = mixed_plan(model)
    plan.non_expert["attention"] = {"bits": 8, "group_size": None, "symmetric": True}
    plan.non_expert["lm_head"] = {"bits": 4, "group_size": 32, "symmetric": False}
    plan.validate()
    quantize_(model, MoEQuantConfig(plan), progress=False)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj.weight, PackedLinearWeight) and attn.q_proj.weight.bits == 8
    assert isinstance(model.lm_head.weight, PackedLinearWeight) and model.lm_head.weight.bits == 4
    assert not isinstance(model.model.embed_tokens.weight, PackedLinearWeight)  # embeddings: float
    assert not isinstance(model.model.layers[0].mlp.gate.weight, PackedLinearWeight)  # router: float
    _logits(model, torch.randint(0, 100, (1, 4)))


def test_layer_helpers_are_what_calibrated_quantizers_call():
    model = tiny_random_model("MixtralForCausalLM")
    layer = find_moe_layers(model)[0]
    bits = [2] * 4 + [3] * 4
    q = quantize_layer_experts(layer, bits, RTNQuantizer(), 32, True)
    assert set(q) == set(layer.projections) and [w.bits for w in q["down_proj"]] == bits
    assert all(w.symmetric for w in q["gate_up_proj"])
    install_quantized_layer(model, layer, q)
    t = model.model.layers[0].mlp.experts.down_proj
    assert isinstance(t, MixedWidthExpertsTensor) and t.symmetric and t.widths == (2, 3)
    with pytest.raises(ValueError, match="widths given"):
        quantize_layer_experts(layer, [2, 3], RTNQuantizer(), 32, False)


def test_bad_inputs_fail_with_one_clear_message(tmp_path):
    model = tiny_random_model("MixtralForCausalLM")
    with pytest.raises(BitPlanError, match="no such bit plan"):
        quantize_(model, MoEQuantConfig(tmp_path / "missing.json"))
    other = tiny_random_model("MixtralForCausalLM", num_layers=1)
    plan = BitPlan.uniform(find_moe_layers(other), 2, group_size=32)
    with pytest.raises(BitPlanError, match="do not match the model"):
        quantize_(model, MoEQuantConfig(plan))
    with pytest.raises(ValueError, match="unknown quantizer"):
        quantize_(model, MoEQuantConfig(mixed_plan(model), quantizer="nope"))
    with pytest.raises(TypeError, match="MoEQuantConfig"):
        quantize_(model, {"plan": "x"})
    # nothing was half-applied
    assert not isinstance(model.model.layers[0].mlp.experts.gate_up_proj, MixedWidthExpertsTensor)


def test_zoo_tiny_at_2_5_bits_parity_memory_and_bits_per_byte(tiny_zoo_dir):
    """Trained weights (zoo `tiny`, Mixtral): half the experts at 3 bits, half at 2 (2.5 mean), RTN g=64."""
    from moe_export.eval import bits_per_byte, logits_fn_for
    from moe_export.zoo.data import token_stream
    from moe_export.zoo.folders import load

    model, tok = load(tiny_zoo_dir, which="finetuned")
    ids = token_stream(tok, "python-stdlib", "test")[: 64 * 16]
    float_bpb = bits_per_byte(logits_fn_for(model), tok, ids, 64, progress=False)["bits_per_byte"]
    x = ids[: 64 * 4].view(4, 64)
    float_logits = _logits(model, x)
    plan = mixed_plan(model, widths=(3, 2), group_size=64)
    quantize_(model, MoEQuantConfig(plan), progress=False)
    held, theory = expert_bytes(model), theoretical_expert_bytes(model, plan)
    assert abs(held / theory - 1) < 0.03, f"experts hold {held} B, theoretical {theory:.0f} B"
    q_logits = _logits(model, x)
    sqnr = 10 * torch.log10(float_logits.pow(2).mean() / (float_logits - q_logits).pow(2).mean()).item()
    q_bpb = bits_per_byte(logits_fn_for(model), tok, ids, 64, progress=False)["bits_per_byte"]
    # measured on tiny-s0 (python-stdlib test split, 1024 tokens): logits SQNR 17.72 dB, bits per byte
    # float 2.8928 -> 2.5-bit RTN 2.9110
    assert sqnr > 15, f"zoo tiny logits SQNR vs float {sqnr:.2f} dB"
    assert float_bpb < q_bpb < float_bpb * 1.05, f"bits per byte float {float_bpb:.4f}, 2.5-bit RTN {q_bpb:.4f}"
    print(f"zoo tiny: logits SQNR {sqnr:.2f} dB, bpb float {float_bpb:.4f} -> 2.5-bit RTN {q_bpb:.4f}")
