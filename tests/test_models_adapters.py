"""MoE adapters on tiny random models of every supported architecture."""

import pytest
import torch
import torch.nn.functional as F

from moe_export.model_configs import TINY_ARCHITECTURES, tiny_config, tiny_random_model
from moe_export.models import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    find_moe_layers,
    parameter_role,
)

# (MoE layer names, shared-expert suffix or None) the tiny configs must produce
EXPECTED = {
    "MixtralForCausalLM": (["model.layers.0.mlp", "model.layers.1.mlp"], None),
    "Qwen3MoeForCausalLM": (["model.layers.0.mlp", "model.layers.1.mlp"], None),
    "OlmoeForCausalLM": (["model.layers.0.mlp", "model.layers.1.mlp"], None),
    "Qwen2MoeForCausalLM": (["model.layers.0.mlp", "model.layers.1.mlp"], "shared_expert"),
    "DeepseekV2ForCausalLM": (["model.layers.1.mlp"], "shared_experts"),
    "DeepseekV3ForCausalLM": (["model.layers.1.mlp", "model.layers.2.mlp"], "shared_experts"),
    "SwitchTransformersForConditionalGeneration": (["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"], None),
}


def parameter_roles(model) -> dict[str, str]:
    """{FQN: role} for every parameter and buffer of ``model``."""
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + [n for n, _ in model.named_buffers()]
    return {n: parameter_role(model, n) for n in names}


def expert_param_names(layer) -> list[str]:
    """FQNs of every parameter holding routed-expert weights of ``layer``."""
    if layer.fused:
        return [layer.param_name(p) for p in layer.projections]
    return [layer.param_name(p, e) for e in range(layer.num_experts) for p in layer.projections]


def test_every_supported_architecture_has_a_tiny_config():
    assert set(TINY_ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES) == set(EXPECTED)


@pytest.fixture(scope="module", params=SUPPORTED_ARCHITECTURES)
def arch_model(request):
    return request.param, tiny_random_model(request.param, seed=0)


def _expected_top_k(arch):
    return 1 if arch.startswith("Switch") else tiny_config(arch).num_experts_per_tok


def test_layers_router_shapes_counts(arch_model):
    arch, model = arch_model
    names, _ = EXPECTED[arch]
    layers = find_moe_layers(model)
    assert [l.name for l in layers] == names
    params = dict(model.named_parameters())
    for l in layers:
        assert model.get_submodule(l.name) is l.block
        assert l.num_experts == 8 and l.hidden_size == 64 and l.intermediate_size == 128
        assert l.top_k == _expected_top_k(arch)
        assert tuple(l.router_weight.shape) == (l.num_experts, l.hidden_size)
        assert l.router_param_name in params
        assert l.fused == (not arch.startswith("Switch"))
        if l.fused:
            assert len(l.experts.gate_up_proj) == l.num_experts
        else:
            assert len(l.experts) == l.num_experts
        assert l.architecture == arch


def test_views_share_storage_and_write_through(arch_model):
    arch, _ = arch_model
    model = tiny_random_model(arch, seed=1)  # mutated below: not the shared fixture
    params = dict(model.named_parameters())
    for l in find_moe_layers(model):
        router = params[l.router_param_name]
        assert l.router_weight.data_ptr() == router.data_ptr()
        with torch.no_grad():
            l.router_weight[1, 2] = 7.5
        assert router[1, 2].item() == 7.5
        for e in (0, 5, l.num_experts - 1):
            v = l.expert(e)
            for proj in l.projections:
                p = params[l.param_name(proj, e)]
                w = l.expert_weight(proj, e)
                assert w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
                assert torch.equal(w, p[e] if l.fused else p)
            gu = params[l.param_name(l.projections[0], e)]
            first_param = gu[e] if l.fused else gu
            # first/gate are the leading I rows of expert e's gate_up block (or all of wi)
            assert v.first.data_ptr() == first_param.data_ptr()
            assert tuple(v.first.shape) == (l.intermediate_size, l.hidden_size)
            assert tuple(v.down.shape) == (l.hidden_size, l.intermediate_size)
            if l.fused:
                assert v.gate.data_ptr() == first_param.data_ptr()
                assert v.up.data_ptr() == first_param.data_ptr() + l.intermediate_size * l.hidden_size * 4
            else:
                assert v.gate is None and v.up.data_ptr() == v.first.data_ptr()
            with torch.no_grad():
                v.first[3, 4] = 11.0 + e
                v.down[2, 1] = -3.0 - e
            assert first_param[3, 4].item() == 11.0 + e
            dparam = params[l.param_name(l.projections[1], e)]
            assert (dparam[e] if l.fused else dparam)[2, 1].item() == -3.0 - e


def test_views_compute_the_experts_forward(arch_model):
    """The view semantics (gate rows first, then up; Switch wi/wo) reproduce each expert's own output."""
    arch, model = arch_model
    torch.manual_seed(0)
    x = torch.randn(5, 64)  # [T, H]
    for l in find_moe_layers(model):
        for e in (0, 6):
            v = l.expert(e)
            if l.fused:
                ref = l.experts(x, torch.full((5, 1), e), torch.ones(5, 1))
                act = l.experts.act_fn
                ours = (act(x @ v.gate.T) * (x @ v.up.T)) @ v.down.T
            else:
                ref = l.experts[f"expert_{e}"](x)
                ours = F.relu(x @ v.up.T) @ v.down.T
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_shared_experts_reported_separately(arch_model):
    arch, model = arch_model
    _, shared = EXPECTED[arch]
    params = dict(model.named_parameters())
    for l in find_moe_layers(model):
        if shared is None:
            assert l.shared_experts == []
            continue
        assert l.shared_experts == [f"{l.name}.{shared}"]
        assert l.num_experts == 8  # routed only: the shared expert is not counted
        sh = model.get_submodule(l.shared_experts[0])
        assert sh is not l.experts and not l.shared_experts[0].startswith(f"{l.name}.experts")
        routed_ptrs = {params[n].data_ptr() for n in expert_param_names(l)}
        for n, p in sh.named_parameters():
            assert p.data_ptr() not in routed_ptrs
            assert parameter_role(model, f"{l.shared_experts[0]}.{n}") == "shared_experts"


def test_parameter_roles(arch_model):
    arch, model = arch_model
    roles = parameter_roles(model)
    layers = find_moe_layers(model)
    expert_params = {n for l in layers for n in expert_param_names(l)}
    assert {n for n, r in roles.items() if r == "experts"} == expert_params
    assert {n for n, r in roles.items() if r == "router" and n.endswith("weight") and "shared_expert_gate" not in n} == {
        l.router_param_name for l in layers
    }
    assert roles["lm_head.weight"] == "lm_head"
    assert "attention" in roles.values() and "norm" in roles.values() and "embeddings" in roles.values()
    named = dict(model.named_parameters(remove_duplicate=False))
    for n, r in roles.items():
        if r == "attention":
            assert any(s in n for s in ("self_attn", "SelfAttention", "EncDecAttention")), n
        if r == "norm":
            assert n in named and named[n].dim() == 1, n
        if r == "embeddings" and n in named:
            assert named[n].shape[0] == 512, n  # vocab rows
    if arch == "DeepseekV3ForCausalLM":  # layer 0 is a dense MLP (first_k_dense_replace=1)
        assert roles["model.layers.0.mlp.gate_proj.weight"] == "dense_mlp"
        assert roles["model.layers.1.mlp.gate.e_score_correction_bias"] == "router"
    if arch.startswith("Switch"):  # block 0 is dense in both stacks
        assert roles["encoder.block.0.layer.1.mlp.wi.weight"] == "dense_mlp"
        assert roles["decoder.block.0.layer.2.mlp.wo.weight"] == "dense_mlp"
        assert roles["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] == "attention"
        assert roles["encoder.block.0.layer.0.layer_norm.weight"] == "norm"
        assert roles["shared.weight"] == "embeddings"
    if arch == "Qwen2MoeForCausalLM":
        assert roles["model.layers.0.mlp.shared_expert_gate.weight"] == "router"


def test_bad_indices_and_projections():
    model = tiny_random_model("SwitchTransformersForConditionalGeneration")
    l = find_moe_layers(model)[0]
    with pytest.raises(IndexError, match="out of range"):
        l.expert(8)
    with pytest.raises(KeyError, match="unknown projection"):
        l.expert_weight("gate_up_proj", 0)
    with pytest.raises(ValueError, match="per expert"):
        l.param_name("wi")
    fused = find_moe_layers(tiny_random_model("MixtralForCausalLM"))[0]
    assert fused.param_name("down_proj") == "model.layers.0.mlp.experts.down_proj"
    with pytest.raises(IndexError):
        fused.expert_weight("down_proj", -1)


def test_unsupported_model_raises_clear_error():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    with pytest.raises(UnsupportedModelError) as err:
        find_moe_layers(LlamaForCausalLM(cfg))
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg
    assert all(a in msg for a in SUPPORTED_ARCHITECTURES)
    assert isinstance(err.value, ValueError) and err.value.architecture == "LlamaForCausalLM"
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        parameter_role(LlamaForCausalLM(cfg), "lm_head.weight")


def test_compiled_model_reports_the_same_names():
    model = tiny_random_model("OlmoeForCausalLM")
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    assert [l.name for l in find_moe_layers(compiled)] == [l.name for l in find_moe_layers(model)]
    assert parameter_role(compiled, "model.layers.0.mlp.experts.down_proj") == "experts"


def test_tiny_config_neutral_overrides():
    for arch in SUPPORTED_ARCHITECTURES:
        kw = dict(num_experts=4, expert_intermediate_size=64, hidden_size=32)
        if not arch.startswith("Switch"):
            kw["top_k"] = 3
        layers = find_moe_layers(tiny_random_model(arch, **kw))
        assert {(l.num_experts, l.top_k, l.hidden_size, l.intermediate_size) for l in layers} == {
            (4, kw.get("top_k", 1), 32, 64)}
    with pytest.raises(ValueError, match="one expert"):
        tiny_config("SwitchTransformersForConditionalGeneration", top_k=2)
    a = tiny_random_model("MixtralForCausalLM", seed=5)
    b = tiny_random_model("MixtralForCausalLM", seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_roles_follow_the_module_tree_as_it_is_now():
    # nothing is cached per model: after a block is replaced the roles are those of the new tree
    model = tiny_random_model("MixtralForCausalLM", seed=0)
    assert parameter_role(model, "model.layers.0.mlp.experts.gate_up_proj") == "experts"

    class MLP(torch.nn.Module):  # a dense MLP where the MoE block was
        def __init__(self):
            super().__init__()
            self.gate_proj = torch.nn.Linear(64, 8)

    model.model.layers[0].mlp = MLP()
    assert parameter_role(model, "model.layers.0.mlp.gate_proj.weight") == "dense_mlp"
