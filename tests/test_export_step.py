"""The exportable decoder step (static KV cache as explicit I/O) against HF's own forward, in eager."""

import copy

import pytest
import torch

from _packed_experts import dequantized_reference, quantize_experts_
from moe_export.export.experts import PackedMixedExperts
from moe_export.export.prepare import prepare_for_export, theoretical_size
from moe_export.export.runners import EagerStepRunner, greedy_generate
from moe_export.export.wrapper import DecoderStep
from moe_export.model_configs import tiny_random_model

# Qwen2-MoE (shared expert behind a sigmoid gate) and DeepSeek-V3 (shared experts, grouped routing, MLA latent cache)
ARCHS = ["MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM",
         "DeepseekV3ForCausalLM"]


@pytest.mark.parametrize("arch", ARCHS)
def test_step_prefill_and_decode_match_hf_forward(arch):
    fmodel = tiny_random_model(arch, seed=0).eval()
    qmodel = quantize_experts_(copy.deepcopy(fmodel), [2, 3, 4, 8, 2, 3, 4, 8], group_size=32)
    assert all(isinstance(m, PackedMixedExperts) for m in qmodel.modules() if type(m).__name__.endswith("Experts")
               or isinstance(m, PackedMixedExperts))
    ref = dequantized_reference(fmodel, qmodel)  # HF's own expert code on the dequantized weights
    ref.set_experts_implementation("eager")
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 10))
    with torch.no_grad():
        want = ref(ids).logits[0]
        runner = EagerStepRunner(DecoderStep(qmodel, max_seq_len=16))
        prefill = runner.step(ids[:, :6], 0)[0]
        decode = torch.cat([runner.step(ids[:, t : t + 1], t)[0] for t in range(6, 10)])
    got = torch.cat([prefill, decode])
    assert (got - want).abs().max() < 1e-5  # measured <= 2.1e-7
    # and quantization really happened (the reference is not the float model)
    with torch.no_grad():
        assert (fmodel(ids).logits[0] - want).abs().max() > 1e-3


def test_step_cache_positions_are_independent():
    # prefill in one call == prefill token by token (positions, mask and one-hot cache writes agree)
    model = prepare_for_export(tiny_random_model("MixtralForCausalLM", seed=1))
    step = DecoderStep(model, max_seq_len=12)
    ids = torch.randint(0, 512, (1, 7))
    a, b = EagerStepRunner(step), EagerStepRunner(step)
    whole = a.step(ids, 0)[0]
    single = torch.cat([b.step(ids[:, t : t + 1], t)[0] for t in range(7)])
    assert (whole - single).abs().max() < 1e-5
    assert torch.allclose(a.k, b.k, atol=1e-6) and a.k[:, :, :, 7:].abs().max() == 0
    assert len(greedy_generate(a, ids[0, :3], new_tokens=9)) == 9
    with pytest.raises(ValueError, match="exceed the exported cache of 12"):
        greedy_generate(a, ids[0, :3], new_tokens=11)  # the 11th token needs position 12


def test_step_leaves_the_callers_model_as_it_was():
    model = tiny_random_model("MixtralForCausalLM", seed=0).train()
    impl = model.config._attn_implementation
    step = DecoderStep(model, max_seq_len=16)
    assert impl != "eager" and model.config._attn_implementation == impl and model.training
    assert step.model.config._attn_implementation == "eager" and not step.model.training
    # the step's copy holds the caller's weights themselves, not copies of them
    assert all(a is b for a, b in zip(model.parameters(), step.model.parameters()))


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_attention_equals_eager_attention(arch):
    """The attention of the native .onnx (query heads grouped per key/value head, no repeat_kv copy) computes
    transformers' eager attention bit for bit: directly (GQA and MHA shapes, prefill and decode, masked slots),
    and as a whole step of each architecture."""
    from transformers.models.mixtral.modeling_mixtral import eager_attention_forward

    from moe_export.export.wrapper import grouped_eager_attention, use_grouped_attention

    g = torch.Generator().manual_seed(0)
    for heads, kv_heads, t in ((4, 2, 1), (4, 2, 5), (6, 3, 3), (4, 4, 2), (8, 1, 1)):
        module = torch.nn.Module().eval()
        module.num_key_value_groups = heads // kv_heads
        q, k, v = (torch.randn(1, n, m, 8, generator=g) for n, m in ((heads, t), (kv_heads, 16), (kv_heads, 16)))
        mask = torch.where(torch.rand(1, 1, t, 16, generator=g) < 0.7, 0.0, torch.finfo(torch.float32).min)
        want, want_w = eager_attention_forward(module, q, k, v, mask, 0.35)
        got, got_w = grouped_eager_attention(module, q, k, v, mask, 0.35)
        assert torch.equal(got, want) and torch.equal(got_w, want_w)
        # the native .pte's form: the same dot products as n_rep * T rows per kv head (other blockings: float rounding)
        rows, rows_w = grouped_eager_attention(module, q, k, v, mask, 0.35, rows=True)
        assert rows.shape == want.shape and rows_w.shape == want_w.shape
        assert torch.allclose(rows, want, rtol=0, atol=1e-6) and torch.allclose(rows_w, want_w, rtol=0, atol=1e-6)

    model = prepare_for_export(tiny_random_model(arch, seed=0))
    eager, grouped = DecoderStep(model, max_seq_len=12), DecoderStep(model, max_seq_len=12)
    use_grouped_attention(grouped)
    assert eager.model.config._attn_implementation == "eager"  # each step holds its own config
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    a, b = EagerStepRunner(eager), EagerStepRunner(grouped)
    assert torch.equal(a.step(ids[:, :5], 0), b.step(ids[:, :5], 0))
    assert torch.equal(a.step(ids[:, 5:6], 5), b.step(ids[:, 5:6], 5)) and torch.equal(a.k, b.k)
    rows = DecoderStep(model, max_seq_len=12)
    use_grouped_attention(rows, rows=True)
    c = EagerStepRunner(rows)
    for got, want in ((c.step(ids[:, :5], 0), a.step(ids[:, :5], 0)), (c.step(ids[:, 5:6], 5), a.step(ids[:, 5:6], 5))):
        assert torch.allclose(got, want, rtol=0, atol=1e-5 * want.abs().max())



@pytest.mark.parametrize("arch", ARCHS)
def test_scatter_cache_write_equals_one_hot_write(arch):
    """The native .onnx's cache write (``DecoderStep.scatter_cache``: a scatter of the step's rows) gives the
    one-hot matmul write's logits and caches bit for bit, through a prefill, decode steps that read what earlier
    steps wrote, and a prefill over slots written before (the rows it does not rewrite are kept)."""
    model = prepare_for_export(tiny_random_model(arch, seed=0))
    one_hot, scatter = DecoderStep(model, max_seq_len=12), DecoderStep(model, max_seq_len=12)
    scatter.scatter_cache = True
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    a, b = EagerStepRunner(one_hot), EagerStepRunner(scatter)
    for tokens, pos in ((ids[:, :5], 0), (ids[:, 5:6], 5), (ids[:, 6:7], 6), (ids[:, 7:9], 3)):
        assert torch.equal(a.step(tokens, pos), b.step(tokens, pos))
        assert torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert b.k[:, :, :, :7].abs().sum(-1).gt(0).all() and not b.k[:, :, :, 7:].any()  # slots 0-6 written, 7- empty

def test_clear_errors():
    model = tiny_random_model("MixtralForCausalLM", seed=0)
    with pytest.raises(ValueError, match="sliding_window=8 < max_seq_len=16"):
        m = copy.deepcopy(model)
        m.config.sliding_window = 8
        DecoderStep(m, max_seq_len=16)
    with pytest.raises(ValueError, match="has 8 experts but 3 bit widths"):
        quantize_experts_(copy.deepcopy(model), [2, 3, 4])
    with pytest.raises(ValueError, match="export supports"):
        DecoderStep(torch.nn.Linear(2, 2))


def test_theoretical_size_counts_packed_bits():
    fmodel = tiny_random_model("MixtralForCausalLM", seed=0)
    q = quantize_experts_(copy.deepcopy(fmodel), 3, group_size=32, symmetric=True)
    size = theoretical_size(q)
    cfg = fmodel.config
    n_weights = cfg.num_hidden_layers * cfg.num_local_experts * 3 * cfg.hidden_size * cfg.intermediate_size
    assert size["packed"] == n_weights * 3 / 8 + n_weights / 32 * 2  # codes + one float16 scale per group
    expert_params = sum(p.numel() for n, p in fmodel.named_parameters() if ".experts." in n)
    assert size["float"] == 4 * (sum(p.numel() for p in fmodel.parameters()) - expert_params)
