"""checkpoint_moe_layout (config.json + key names only) agrees with find_moe_layers on the loaded model."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from moe_export.io import SafetensorsCheckpoint
from moe_export.model_configs import tiny_random_model
from moe_export.models import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    checkpoint_moe_layout,
    find_moe_layers,
)


def _save(arch, folder, **kw):
    tiny_random_model(arch, seed=3).save_pretrained(folder, **kw)
    return getattr(transformers, arch).from_pretrained(folder).eval()


def _assert_agrees(folder, model):
    layout = checkpoint_moe_layout(folder)
    layers = find_moe_layers(model)
    assert [k.name for k in layout] == [l.name for l in layers]
    ckpt = SafetensorsCheckpoint(folder)
    for keys, l in zip(layout, layers):
        assert (keys.num_experts, keys.top_k, keys.hidden_size, keys.intermediate_size) == (
            l.num_experts, l.top_k, l.hidden_size, l.intermediate_size)
        assert torch.equal(ckpt.get(keys.router_key), l.router_weight)
        assert len(keys.first) == len(keys.down) == l.num_experts
        for e in range(l.num_experts):
            v = l.expert(e)
            first = keys.first[e].read(ckpt)
            assert first.shape == v.first.shape and torch.equal(first, v.first)  # bit-exact
            assert torch.equal(keys.down[e].read(ckpt), v.down)
            if keys.gate is not None:
                assert torch.equal(keys.gate[e].read(ckpt), v.gate)
            assert torch.equal(keys.up[e].read(ckpt), v.up)
        assert all(k in ckpt for k in keys.expert_keys())
        assert (len(keys.shared_expert_keys) > 0) == (len(l.shared_experts) > 0)
    return layout


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_layout_of_save_pretrained_matches_loaded_model(arch, tmp_path):
    model = _save(arch, tmp_path)
    layout = _assert_agrees(tmp_path, model)
    keys = SafetensorsCheckpoint(tmp_path).keys()
    # transformers 5.23 save_pretrained reverts to the original per-expert keys
    if not arch.startswith("Switch"):
        assert not any(k.endswith("gate_up_proj") for k in keys)
        assert not any(k.fused for k in layout)
    if arch == "MixtralForCausalLM":
        assert layout[0].router_key == "model.layers.0.block_sparse_moe.gate.weight"
        assert layout[0].first[2].key == "model.layers.0.block_sparse_moe.experts.2.w1.weight"
        assert layout[0].down[2].key == "model.layers.0.block_sparse_moe.experts.2.w2.weight"
    if arch.startswith("Switch"):
        assert [k.name.split(".")[0] for k in layout] == ["encoder", "decoder"]
        assert layout[1].first[7].key == "decoder.block.1.layer.2.mlp.experts.expert_7.wi.weight"


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "DeepseekV3ForCausalLM"])
def test_layout_of_fused_keys(arch, tmp_path):
    """save_original_format=False keeps the 3-D keys; experts are then read as slices of them."""
    model = _save(arch, tmp_path, save_original_format=False)
    layout = _assert_agrees(tmp_path, model)
    assert all(k.fused for k in layout)
    s = layout[0].up[3]
    assert s.key.endswith("mlp.experts.gate_up_proj") and s.expert == 3 and s.rows == (128, 256)


def test_layout_of_sharded_checkpoint(tmp_path):
    model = _save("Qwen2MoeForCausalLM", tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_agrees(tmp_path, model)


def test_layout_rejects_unsupported_and_incomplete(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "llama")
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*MixtralForCausalLM"):
        checkpoint_moe_layout(tmp_path / "llama")

    folder = tmp_path / "olmoe"
    tiny_random_model("OlmoeForCausalLM").save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="experts.5.up_proj.weight"):
        checkpoint_moe_layout(folder)

    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_experts"] = 6
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_experts=6"):
        checkpoint_moe_layout(folder)
