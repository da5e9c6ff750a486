"""Quantized checkpoints: bit-exact round trip, size on disk, loading without float weights, CLI."""

import json

import pytest
import torch
from click.testing import CliRunner

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.checkpoint import save_quantized
from moe_export.hf import load_quantized
from moe_export.io import CheckpointError
from moe_export.model_configs import tiny_random_model
from moe_export.size import safetensors_bytes, theoretical_model_bytes
from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight
from tests._mixed_plans import mixed_plan


def _flat_state(model):
    out = {}
    for name, p in model.named_parameters():
        if isinstance(p, (MixedWidthExpertsTensor, PackedLinearWeight)):
            names, attrs = p.__tensor_flatten__()
            out.update({f"{name}.{n}": getattr(p, n) for n in names})
            out[f"{name}#attrs"] = attrs
        else:
            out[name] = p
    return out


def _logits(model, ids):
    kw = {"decoder_input_ids": ids} if "Switch" in type(model).__name__ else {}
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen2MoeForCausalLM", "SwitchTransformersForConditionalGeneration"])
def test_save_load_round_trip_is_bit_exact(arch, tmp_path):
    model = tiny_random_model(arch)
    plan = mixed_plan(model, widths=(3, 2, 4, 8, 1))
    plan.non_expert["attention"] = {"bits": 8, "group_size": None, "symmetric": True}
    plan.non_expert["shared_experts"] = {"bits": 4, "group_size": 32, "symmetric": False}
    plan.validate()
    quantize_(model, MoEQuantConfig(plan), progress=False)
    save_quantized(model, tmp_path / "q")
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["bitplan.json", "config.json", "model.safetensors"]
    assert json.loads((tmp_path / "q" / "bitplan.json").read_text()) == plan.to_dict()

    loaded = load_quantized(tmp_path / "q")
    assert loaded.moe_export_plan.to_dict() == plan.to_dict()
    a, b = _flat_state(model), _flat_state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("#attrs"):
            assert a[k] == b[k], k
        else:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} differs after the round trip"
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))


def test_size_on_disk_within_3_percent_of_theoretical(tmp_path):
    # experts dominate, as in real MoE models: 2 layers x 8 experts of [2*512, 256] + [256, 512]
    model = tiny_random_model("MixtralForCausalLM", hidden_size=256, expert_intermediate_size=512, num_layers=2)
    plan = mixed_plan(model, widths=(3, 2), group_size=128)
    quantize_(model, MoEQuantConfig(plan), progress=False)
    save_quantized(model, tmp_path)
    got, want = safetensors_bytes(tmp_path), theoretical_model_bytes(model)
    assert abs(got / want - 1) < 0.03, f"file {got} B vs theoretical {want:.0f} B ({100 * (got / want - 1):+.2f}%)"


def test_load_never_materialises_float_weights(tmp_path, monkeypatch):
    model = tiny_random_model("MixtralForCausalLM")
    quantize_(model, MoEQuantConfig(mixed_plan(model)), progress=False)
    save_quantized(model, tmp_path)
    from moe_export import checkpoint

    # spy on the production path: when the holders are installed, the skeleton transformers built holds no
    # float weight anywhere (parameters on meta), and the experts' stand-ins have the stored parts' shapes
    seen = {}
    install = checkpoint.install_holders

    def spy(m, layout):
        install(m, layout)
        seen["params"] = {n: p.device.type for n, p in m.named_parameters()}
        holder = m.model.layers[0].mlp.experts.gate_up_proj
        seen["holder"] = {n: (b.device.type, tuple(b.shape), b.dtype) for n, b in holder.named_buffers()}

    monkeypatch.setattr(checkpoint, "install_holders", spy)
    loaded = load_quantized(tmp_path)
    assert seen["params"] and set(seen["params"].values()) == {"meta"}
    stored = model.model.layers[0].mlp.experts.gate_up_proj
    names, _ = stored.__tensor_flatten__()
    assert seen["holder"] == {n: ("meta", tuple(getattr(stored, n).shape), getattr(stored, n).dtype) for n in names}
    experts = loaded.model.layers[0].mlp.experts
    assert isinstance(experts.gate_up_proj, MixedWidthExpertsTensor)
    assert loaded.config._experts_implementation == "moe_export_mixed"


def test_bad_checkpoints_fail_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_quantized(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_quantized(tmp_path)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a moe_export quantized checkpoint"):
        load_quantized(tmp_path)
    model = tiny_random_model("MixtralForCausalLM")
    with pytest.raises(ValueError, match="needs the BitPlan"):
        save_quantized(model, tmp_path / "out")


def test_cli_quantize_writes_a_loadable_checkpoint(tmp_path):
    from moe_export.cli import main

    model = tiny_random_model("Qwen3MoeForCausalLM")
    model.save_pretrained(tmp_path / "float")
    plan = mixed_plan(model, widths=(3, 2))
    plan.save(tmp_path / "plan.json")
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "float"), "--plan", str(tmp_path / "plan.json"),
                                    "-o", str(tmp_path / "q"), "-q"])
    assert res.exit_code == 0, res.output
    assert "theoretical" in res.output
    loaded = load_quantized(tmp_path / "q")
    quantize_(model, MoEQuantConfig(plan), progress=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    assert torch.equal(_logits(model, ids), _logits(loaded, ids))
    res = CliRunner().invoke(main, ["quantize", str(tmp_path / "float"), "--plan", str(tmp_path / "plan.json"),
                                    "--quantizer", "nope", "-o", str(tmp_path / "q2")])
    assert res.exit_code != 0 and "unknown quantizer" in res.output
    assert not (tmp_path / "q2").exists()
