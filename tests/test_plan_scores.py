"""Scores: router-norm change, MaxVar, weight reconstruction error, PMQ output error, routing statistics."""

import pytest
import torch

from moe_export.model_configs import tiny_random_model
from moe_export.models import find_moe_layers
from moe_export.plan import maxvar as mv, pmq, router_norm, weight_error
from moe_export.plan.calibration_stats import routing_statistics
from moe_export.quant.base import get_quantizer


def test_router_norm_change_is_signed_and_has_proxy():
    ref = torch.randn(4, 16)
    final = ref.clone()
    final[0] *= 0.5  # shrinks: negative change
    final[1] *= 2.0  # grows
    L = router_norm.router_norm_change(final, ref)
    n = torch.linalg.vector_norm(ref.double(), dim=1)
    assert torch.allclose(L, torch.tensor([-0.5, 1.0, 0.0, 0.0], dtype=torch.float64) * n)
    assert L[0] < 0 < L[1]
    assert torch.allclose(router_norm.router_norm_change(final, ref, absolute=True), L.abs())
    # no reference: the final norm is the proxy
    assert torch.allclose(router_norm.router_norm_change(final), torch.linalg.vector_norm(final.double(), dim=1))
    assert router_norm.ascending_order(L) == [0, 2, 3, 1]  # ties (2, 3) keep expert order
    with pytest.raises(ValueError, match="same architecture"):
        router_norm.router_norm_change(final, ref[:, :8])


def test_ascending_order_is_stable_on_ties():
    assert router_norm.ascending_order(torch.tensor([1.0, 0.0, 1.0, 0.0])) == [1, 3, 0, 2]


def test_maxvar_paper_and_largest_norm_row():
    W = torch.zeros(3, 8)
    W[0] = torch.tensor([5.0] * 8)  # largest norm, zero variance
    W[1] = torch.tensor([1.0, -1.0] * 4)  # variance 8/7
    W[2] = torch.tensor([0.5, -0.5] * 4)
    assert mv.maxvar(W, "paper") == pytest.approx(8 / 7)
    assert mv.maxvar(W, "largest-norm-row") == 0.0
    with pytest.raises(ValueError, match="unknown MaxVar variant"):
        mv.maxvar(W, "mean")


def test_maxvar_matches_definition_and_chunking_bf16():
    # rows with a large mean (offset 5) check the two-pass variance keeps its digits
    W = (torch.randn(300, 64) * torch.linspace(0.1, 3, 300)[:, None] + 5.0).to(torch.bfloat16)
    ref = torch.var(W.double(), dim=1)
    var, sq = mv.exact_row_var(W), mv.row_sq_norms(W, chunk=7)  # what maxvar() scores rows with
    # measured max relative error vs float64: ~4e-7 (float32 sums); 1e-5 leaves headroom, one-pass fails it
    assert torch.allclose(var.double(), ref, rtol=1e-5, atol=0)
    assert torch.allclose(sq.double(), W.double().square().sum(1), rtol=1e-5, atol=0)
    assert torch.allclose(mv.row_sq_norms(W, chunk=10_000), sq, rtol=1e-6, atol=0)
    assert mv.maxvar(W) == pytest.approx(float(ref.max()), rel=1e-5)
    assert mv.maxvar(W, "largest-norm-row") == pytest.approx(float(ref[torch.argmax(W.double().square().sum(1))]), rel=1e-5)
    assert torch.equal(mv.layer_maxvar([W, lambda: W * 2]), torch.tensor([mv.maxvar(W), mv.maxvar(W * 2)], dtype=torch.float64))


def test_maxvar_bound_search_is_exact_when_the_widest_row_has_the_smallest_norm():
    # 200 rows with a large mean and tiny spread (large norms), one zero-mean row with the largest variance
    W = torch.randn(201, 128) * 0.01 + torch.linspace(3, 4, 201)[:, None]
    W[100] = torch.randn(128) * 0.5
    ref = torch.var(W.double(), dim=1)
    assert torch.argmax(ref) == 100 and torch.argmin(W.square().sum(1)) == 100
    assert mv.maxvar(W) == pytest.approx(float(ref.max()), rel=1e-12)  # float64 on the candidate rows


def test_weight_error_decreases_with_bits_and_chunking_is_exact():
    q = get_quantizer("rtn")
    W = torch.randn(96, 64)
    errs = weight_error.expert_errors([W, W.T.contiguous()], [4, 3, 2, 1], q, 32, False)
    assert torch.all(errs[:-1] < errs[1:]), errs  # more bits, less error
    whole = weight_error.reconstruction_error(W, 3, q, 32, False, chunk=10_000)
    chunked = weight_error.reconstruction_error(W, 3, q, 32, False, chunk=17)
    assert chunked == pytest.approx(whole, rel=1e-12)
    direct = float((W - q.quantize(W, 3, 32, False).dequantize()).square().sum())
    assert whole == pytest.approx(direct, rel=1e-6)


def test_router_weighting_range():
    c = weight_error.router_weighting(torch.tensor([0.0, 1.0, 2.0]), 1.0)
    assert torch.allclose(c, torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64))
    assert torch.equal(weight_error.router_weighting(torch.tensor([1.0, 2.0]), 0.0), torch.ones(2, dtype=torch.float64))


def test_weight_error_allocation_gives_bits_to_the_hard_expert():
    err = torch.tensor([[1.0, 2.0], [1.0, 100.0], [1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)  # levels [3, 2]
    assert weight_error.allocate(err, [3, 2], 2.25) == [2, 3, 2, 2]
    # router weighting can override a small error difference
    err = torch.tensor([[1.0, 2.0], [1.0, 2.1]], dtype=torch.float64)
    assert weight_error.allocate(err, [3, 2], 2.5) == [2, 3]
    assert weight_error.allocate(err, [3, 2], 2.5, torch.tensor([3.0, 1.0])) == [3, 2]


def test_pmq_output_error_and_cost():
    q = get_quantizer("rtn")
    g, u, d = torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32)
    x = torch.randn(20, 16)
    err = pmq.output_errors(x, g, u, d, torch.nn.functional.silu, [4, 3, 2], q, 16, False)
    assert torch.all(err[:-1] < err[1:]) and err[0] > 0
    # Switch form (no gate) and an expert that saw no token
    assert pmq.output_errors(x, None, u, d, torch.relu, [3, 2], q, 16, False).shape == (2,)
    assert torch.equal(pmq.output_errors(x[:0], g, u, d, torch.relu, [3, 2], q, 16, False), torch.zeros(2, dtype=torch.float64))
    f, w, e = torch.tensor([0.5, 0.25]), torch.tensor([0.4, 0.9]), torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    cost = pmq.pmq_cost(f, w, e)
    assert torch.allclose(cost, torch.tensor([[0.5 * 0.4**1.5 * 1, 0.5 * 0.4**1.5 * 2], [0.25 * 0.9**1.5 * 3, 0.25 * 0.9**1.5 * 4]], dtype=torch.float64))


def test_pmq_allocate_prefers_frequent_heavy_experts_and_honours_require():
    err = torch.tensor([[1.0, 2.0, 4.0]] * 4, dtype=torch.float64)  # levels 3, 2, 1
    freq = torch.tensor([0.9, 0.1, 0.5, 0.5], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    bits = pmq.allocate(freq, w, err, [3, 2, 1], 2.0)
    assert bits[0] == 3 and bits[1] == 1
    # require: at least one 3-bit and one 2-bit expert (MC-MoE)
    assert pmq.default_require([1, 2, 3]) == [3, 2] and pmq.default_require([3, 2]) == []
    b = pmq.allocate(torch.ones(4), w, err * torch.tensor([1.0, 1.0, 1.0])[None], [3, 2, 1], 2.0, require=[3, 2])
    assert 3 in b and 2 in b and sum(b) == 8


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "SwitchTransformersForConditionalGeneration", "DeepseekV3ForCausalLM"])
def test_routing_statistics_one_pass(arch):
    model = tiny_random_model(arch, seed=0)
    layers = find_moe_layers(model)
    batches = [torch.randint(3, 500, (2, 16)), torch.randint(3, 500, (1, 16))]
    # independent record of what the router chose, from the experts' own inputs
    seen = {l.name: [] for l in layers}
    hooks = [l.experts.register_forward_pre_hook(lambda m, a, l=l: seen[l.name].append((a[1].clone(), a[2].clone())))
             for l in layers]
    stats = routing_statistics(model, batches, keep_inputs=5, progress=False)
    for h in hooks:
        h.remove()
    assert set(stats) == {l.name for l in layers}
    for l in layers:
        s = stats[l.name]
        assert s["tokens"] == 48
        E = l.num_experts
        idx = torch.cat([i for i, _ in seen[l.name]])
        wts = torch.cat([w for _, w in seen[l.name]])
        if idx.dim() == 3:  # Switch one-hot [T, 1, E], top-1
            hit = idx.reshape(-1, E).bool()
            counts = hit.sum(0).double()
            wsum = (hit.double() * wts.reshape(-1, 1).double()).sum(0)
            assert float(s["frequency"].sum()) <= 1.0 + 1e-9
        else:
            counts = torch.bincount(idx.reshape(-1), minlength=E).double()
            wsum = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), wts.reshape(-1).double())
            assert float(s["frequency"].sum()) == pytest.approx(l.top_k)
        assert torch.allclose(s["frequency"], counts / 48)
        assert torch.allclose(s["mean_weight"], wsum / counts.clamp_min(1))
        assert len(s["inputs"]) == E
        assert all(x.shape[0] == min(5, int(c)) and x.shape[1] == l.hidden_size for x, c in zip(s["inputs"], counts))
