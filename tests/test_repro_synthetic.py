"""The synthetic theory task: data generator, two-layer MoE, training, scores, quantization."""

import pytest
import torch

from moe_export.repro import synthetic as syn

TINY = dict(d=16, n_tokens=8, n_irrelevant=8, n_experts=4, n_neurons=4, batch=32)


def _task(**kw):
    cfg = syn.SyntheticConfig(**{**TINY, **kw})
    return cfg, syn.SyntheticTask(cfg, seed=cfg.seed)


def test_features_are_orthonormal():
    cfg, task = _task(d=32, n_irrelevant=20)
    f = task.features
    assert f.shape == (syn.N_RELEVANT + 20, 32)
    torch.testing.assert_close(f @ f.T, torch.eye(f.shape[0]), atol=1e-5, rtol=0)
    # dense directions, not basis vectors: per-row quantization must not be trivially exact
    assert (f.abs() > 1e-3).float().mean() > 0.9


def test_exactly_one_class_token_per_sample_and_labels_match():
    cfg, task = _task(noise=0.0)
    b = task.sample(500, torch.Generator().manual_seed(1))
    proj = b.x @ task.features.T  # [B, n, F]; noise-free tokens are exactly one feature each
    which = proj.argmax(-1)  # [B, n]
    torch.testing.assert_close(proj.max(-1).values, torch.ones_like(proj.max(-1).values), atol=1e-5, rtol=0)
    relevant = which < syn.N_RELEVANT
    assert (relevant.sum(1) == 1).all()
    assert (relevant.float().argmax(1) == b.pos).all()
    feat = which[torch.arange(500), b.pos]
    # class +1 -> o+ or o+', class -1 -> o- or o-'
    pos_feats = (feat == syn.FREQ_POS) | (feat == syn.RARE_POS)
    assert torch.equal(pos_feats, b.y > 0)
    assert torch.equal(feat >= 2, b.rare)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_infrequent_feature_frequency_matches_alpha(alpha):
    cfg, task = _task(alpha=alpha)
    n = 20000
    b = task.sample(n, torch.Generator().manual_seed(2))
    tol = 4 * (alpha * (1 - alpha) / n) ** 0.5  # 4 binomial standard deviations
    assert abs(b.rare.float().mean().item() - alpha) < tol
    assert abs((b.y > 0).float().mean().item() - 0.5) < 4 * (0.25 / n) ** 0.5


def test_forced_kind_and_determinism():
    cfg, task = _task()
    assert task.sample(64, torch.Generator().manual_seed(0), rare=True).rare.all()
    assert not task.sample(64, torch.Generator().manual_seed(0), rare=False).rare.any()
    a = task.sample(16, torch.Generator().manual_seed(5))
    b = task.sample(16, torch.Generator().manual_seed(5))
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


@pytest.mark.parametrize(
    "bad, msg",
    [(dict(alpha=0.6), "alpha"), (dict(n_irrelevant=40), "orthonormally"), (dict(routing="soft"), "routing"),
     (dict(top_l=0), "top_l"), (dict(n_neurons=3), "even"), (dict(loss="mse"), "loss")],
)
def test_config_rejects_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        syn.SyntheticConfig(**{**TINY, **bad})


def test_expert_choice_gates_pick_top_l_tokens_per_expert():
    cfg, task = _task(top_l=3, router_init_std=1.0)
    model = syn.TwoLayerMoE(cfg, torch.Generator().manual_seed(0))
    b = task.sample(10, torch.Generator().manual_seed(0))
    g = model.gates(b.x)  # [B, n, k]
    assert ((g > 0).sum(1) == 3).all()  # each expert: exactly l tokens of every sample
    torch.testing.assert_close(g.sum(1), torch.ones(10, cfg.n_experts))  # softmax over its tokens
    logits = b.x @ model.router.T
    chosen = logits.topk(3, dim=1).indices
    assert (torch.gather(g, 1, chosen) > 0).all()


def test_token_choice_gates_route_each_token_to_one_expert():
    cfg, task = _task(routing="token_choice", router_init_std=1.0)
    model = syn.TwoLayerMoE(cfg, torch.Generator().manual_seed(0))
    b = task.sample(10, torch.Generator().manual_seed(0))
    g = model.gates(b.x)
    assert ((g > 0).sum(-1) == 1).all()
    probs = torch.softmax(b.x @ model.router.T, -1)
    torch.testing.assert_close(g.sum(-1), probs.max(-1).values)


def test_forward_matches_a_per_sample_loop():
    cfg, task = _task(router_init_std=0.5)
    model = syn.TwoLayerMoE(cfg, torch.Generator().manual_seed(3))
    b = task.sample(4, torch.Generator().manual_seed(3))
    f = model(b.x)
    for i in range(4):
        total = 0.0
        for s in range(cfg.n_experts):
            scores = b.x[i] @ model.router[s]
            top, idx = scores.topk(cfg.top_l)
            gates = torch.softmax(top, 0)
            for gj, j in zip(gates, idx):
                total = total + gj * (model.a[s] * torch.relu(model.w1[s] @ b.x[i, j])).sum()
        torch.testing.assert_close(f[i], total, atol=1e-5, rtol=1e-5)


def test_training_learns_the_task_and_is_deterministic():
    cfg, task = _task(steps=300, lr=0.2, alpha=0.2)
    r1 = syn.train(task, cfg)
    r2 = syn.train(task, cfg)
    assert torch.equal(r1.model.router, r2.model.router)
    first, last = sum(r1.losses[:20]) / 20, sum(r1.losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    assert r1.train_acc > 0.95
    # only W1 and the router are trained; the output layer stays fixed
    torch.testing.assert_close(r1.model.a.abs(), torch.full_like(r1.model.a, 1 / cfg.n_neurons))


def test_scores_follow_their_definitions():
    cfg, task = _task(steps=100, lr=0.2)
    r = syn.train(task, cfg)
    lam = syn.router_norm_change(r)
    torch.testing.assert_close(lam, r.model.router.detach().norm(dim=1) - r.router_init.norm(dim=1))
    feat = syn.learned_feature(r, task)
    assert feat.shape == (cfg.n_experts,) and ((feat >= -1) & (feat < syn.N_RELEVANT)).all()
    mv = syn.maxvar(r.model.w1)
    torch.testing.assert_close(mv, torch.stack([r.model.w1[s].detach().var(dim=1).max() for s in range(cfg.n_experts)]))
    freq = syn.activation_frequency(r.model, task.sample(200, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(freq.sum(), torch.tensor(1.0))


def test_quantize_experts_per_expert_widths():
    from moe_export.quant.rtn import RTNQuantizer

    w1 = torch.randn(4, 6, 16)
    q = syn.quantize_experts(w1, [16, 8, 2, 1])
    assert torch.equal(q[0], w1[0])  # 16 = float
    ref = RTNQuantizer().quantize(w1[2], 2, None, symmetric=False).dequantize()
    assert torch.equal(q[2], ref)
    err = [(q[s] - w1[s]).norm() / w1[s].norm() for s in range(1, 4)]
    assert err[0] < 0.02 < err[1] < err[2]  # 8-bit ~exact, 2-bit and 1-bit increasingly lossy
    table = syn.quantize_table(w1)
    assert torch.equal(syn.quantize_experts(w1, [16, 8, 2, 1], table=table), q)


def test_noise_knob_sets_the_token_noise_norm():
    for noise in (0.0, 0.3, 1.0):
        cfg, task = _task(d=64, n_irrelevant=16, noise=noise)
        b = task.sample(400, torch.Generator().manual_seed(4))
        clean = task.features[(b.x @ task.features.T).argmax(-1)]  # the feature each token was drawn from
        norms = (b.x - clean).norm(dim=-1)
        assert abs(norms.mean().item() - noise) <= 0.05 * noise + 1e-6, (noise, norms.mean().item())


def test_expert_init_knob_sets_the_row_norm_and_leaves_the_router_small():
    for std in (0.1, 2.0):
        cfg = syn.SyntheticConfig(**{**TINY, "d": 64, "n_irrelevant": 16, "expert_init_std": std, "n_neurons": 16})
        model = syn.TwoLayerMoE(cfg, torch.Generator().manual_seed(0))
        rows = model.w1.detach().norm(dim=-1)
        assert abs(rows.mean().item() / (std * 64**0.5) - 1) < 0.05, (std, rows.mean().item())
        assert model.router.detach().norm(dim=1).max() < 10 * cfg.router_init_std * 64**0.5


def _quant_damage(seed, **kw):
    """Float accuracy minus uniform-width accuracy on the worse of the two kinds of samples."""
    cfg, task = _task(d=32, n_tokens=8, n_irrelevant=8, n_experts=4, alpha=0.2, lr=0.1, steps=600, seed=seed, **kw)
    r = syn.train(task, cfg)
    g = torch.Generator().manual_seed(100 + seed)
    sets = [task.sample(500, g, rare=False), task.sample(500, g, rare=True)]
    w1 = r.model.w1.detach()
    fl = [syn.accuracy(r.model, b) for b in sets]
    out = {}
    for bits in (1, 3):
        q = syn.quantize_experts(w1, [bits] * cfg.n_experts)
        out[bits] = max(f - syn.accuracy(r.model, b, q) for f, b in zip(fl, sets))
    return min(fl), out


def test_a_large_expert_init_makes_low_bits_hurt_and_three_bits_not():
    """The sweep's regime in miniature: with a large random W1 part next to the learned feature part,
    1-bit RTN costs clearly more than noise and 3 bits stay near float; the same model with a small
    init loses nothing at 1 bit."""
    big = [_quant_damage(s, expert_init_std=2.0, n_neurons=4) for s in (0, 1, 2)]
    small = [_quant_damage(s, expert_init_std=0.1, n_neurons=4) for s in (0, 1)]
    assert min(f for f, _ in big) > 0.95  # the float model still learns the task
    d1 = sum(d[1] for _, d in big) / 3
    d3 = sum(d[3] for _, d in big) / 3
    assert d1 > 0.05 and d1 > 4 * d3, (d1, d3)
    assert max(d[1] for _, d in small) < 0.01, small
