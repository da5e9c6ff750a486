"""torch.compile of quantized MoE models: one graph, no breaks, same output as eager."""

import pytest
import torch

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.model_configs import tiny_random_model
from tests._mixed_plans import mixed_plan


def _quantized(arch):
    model = tiny_random_model(arch, num_layers=1)
    quantize_(model, MoEQuantConfig(mixed_plan(model)), progress=False)
    assert model.config._experts_implementation == "moe_export_mixed"
    return model


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "arch,seq_len,backend,kernel",
    [
        ("MixtralForCausalLM", 1, "inductor", True),
        ("Qwen3MoeForCausalLM", 1, "aot_eager", True),
        ("Qwen3MoeForCausalLM", 6, "aot_eager", True),
        ("Qwen3MoeForCausalLM", 1, "aot_eager", False),
        ("Qwen3MoeForCausalLM", 6, "aot_eager", False),
        # inductor's C++ builds take 1-2 min each on a loaded 2-core box: the rest runs with -m slow
        pytest.param("Qwen3MoeForCausalLM", 1, "inductor", True, marks=pytest.mark.slow),
        pytest.param("MixtralForCausalLM", 6, "inductor", True, marks=pytest.mark.slow),
        pytest.param("MixtralForCausalLM", 6, "inductor", False, marks=pytest.mark.slow),
    ],
)
def test_compiled_quantized_model_has_no_graph_breaks_and_matches_eager(monkeypatch, arch, seq_len, backend, kernel):
    """With the C++ kernels (CPU): the fused expert FFN op at any T. Without (``MOE_EXPORT_CPU_KERNEL=0``):
    T=1 the gathered packed mat-vec (decode), T=6 12 token-expert pairs > 8, the dense width-group path."""
    from moe_export.kernels import cpu_ops

    monkeypatch.setattr(cpu_ops, "ENABLED", kernel)
    torch._dynamo.reset()
    model = _quantized(arch)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len))
    with torch.no_grad():
        explain = torch._dynamo.explain(model)(ids)
        assert explain.graph_break_count == 0, explain.break_reasons
        assert explain.graph_count == 1
        eager = model(ids).logits
        out = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)(ids).logits
    assert _rel(out, eager) < 1e-5, f"{arch} T={seq_len} {backend}: compiled vs eager rel err {_rel(out, eager):.3g}"


def test_hf_eager_and_batched_mm_run_on_the_packed_experts():
    """transformers' own experts implementations work on the subclass (select / index ops)."""
    model = _quantized("MixtralForCausalLM")
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    outs = {}
    with torch.no_grad():
        for impl in ("moe_export_mixed", "eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(impl)
            outs[impl] = model(ids).logits
    for impl, out in outs.items():
        assert _rel(out, outs["eager"]) < 1e-5, f"{impl} vs eager: {_rel(out, outs['eager']):.3g}"


def test_decoder_step_rope_table_matches_the_rotary_module():
    """DecoderStep reads cos/sin rows from a table outside torch.export (inductor otherwise recomputes them in
    the attention loops); the logits and caches equal the rotary module's path bit for bit."""
    from moe_export.export.wrapper import DecoderStep

    model = _quantized("MixtralForCausalLM")
    step = DecoderStep(model, 32)
    assert step._rope is not None
    k, v = step.empty_cache()
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    with torch.no_grad():
        table = step(ids, torch.tensor([3]), k, v)
        step._rope = None
        module = step(ids, torch.tensor([3]), k, v)
    for a, b in zip(table, module):
        assert torch.equal(a, b)
