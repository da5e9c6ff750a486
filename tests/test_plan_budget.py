"""The whole-model byte budget: parsing, the knapsack solver, version 2 plans, and quantize honouring them."""

import hashlib
import itertools
import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.model_configs import tiny_random_model
from moe_export.plan.bitplan import BITPLAN_TENSORS_VERSION, BitPlan, BitPlanError
from moe_export.plan.budget import BITS, GROUPS, BudgetConfig, BudgetError, Item, budget_plan, parse_budget, solve
from moe_export.size import theoretical_bytes, theoretical_model_bytes


def test_parse_budget():
    assert parse_budget("2.7bpw", 1000) == (2.7 * 1000 / 8, 2.7)
    assert parse_budget("5.1MB", 10**7) == (5.1e6, 8 * 5.1e6 / 10**7)
    assert parse_budget(" 4MiB ", 2**23)[0] == 4 * 2**20
    assert parse_budget("5100000B", 10**7)[0] == 5.1e6
    for bad in ("2.7", "-1bpw", "0MB", "two bpw", "nanbpw"):
        with pytest.raises(BudgetError, match="budget"):
            parse_budget(bad, 1000)


def _stack(key, E, n, k, rng, scale=1.0):
    """An expert stack: error falls ~4x per bit, smaller groups a little lower."""
    variants, cost, nbytes = [], [], []
    for g in GROUPS:
        opts = [(b, g) for b in BITS]
        variants.append(opts)
        base = scale * n * k * rng.uniform(0.5, 2.0, size=(E, 1))  # [E, 1]
        cost.append(base * np.array([4.0 ** -b * (1 - 0.1 * (128 - g) / 96) for b in BITS])[None, :])
        nbytes.append(np.tile([theoretical_bytes(n, k, b, g, False) for b in BITS], (E, 1)))
    return Item(key, "experts", [key], (n, k), variants, cost, nbytes, layer=key, proj="p")


def _tensor(key, n, k, rng):
    opts = [(None, None)] + [(b, g) for g in GROUPS for b in BITS]
    base = n * k * rng.uniform(0.5, 2.0)
    c = np.array([[0.0 if b is None else base * 4.0 ** -b * (1 - 0.1 * (128 - g) / 96) for b, g in opts]])
    nb = np.array([[4.0 * n * k if b is None else theoretical_bytes(n, k, b, g, False) for b, g in opts]])
    return Item(key, "attention", [key], (n, k), [opts], [c], [nb])


def mixtral_8x7b_items(rng):
    """Mixtral-8x7B's tensor count and shapes: 32 layers x (gate_up [8, 28672, 4096], down [8, 4096, 14336],
    q/k/v/o), embeddings and lm_head [32000, 4096]."""
    items = []
    for i in range(32):
        items.append(_stack(f"l{i}.gate_up", 8, 28672, 4096, rng))
        items.append(_stack(f"l{i}.down", 8, 4096, 14336, rng))
        for name, (n, k) in {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096)}.items():
            items.append(_tensor(f"l{i}.{name}", n, k, rng))
    items += [_tensor("embed", 32000, 4096, rng), _tensor("lm_head", 32000, 4096, rng)]
    return items


def test_solver_meets_the_budget_in_well_under_a_second_at_mixtral_8x7b_size():
    items = mixtral_8x7b_items(np.random.default_rng(0))
    params = sum(it.shape[0] * it.shape[1] * it.cost[0].shape[0] for it in items)
    for bpw in (2.2, 2.7, 3.7):
        budget = bpw * params / 8
        t = time.perf_counter()
        sol = solve(items, budget)
        seconds = time.perf_counter() - t
        assert seconds < 1.0, seconds
        assert budget * 0.99 <= sol.nbytes <= budget  # fits, and leaves under 1% unspent
        # never worse than spending the same bytes on one uniform width (group 128) for every tensor
        for b in BITS:
            uni_bytes = sum(theoretical_bytes(*it.shape, b, 128, False) * it.cost[0].shape[0] for it in items)
            if uni_bytes <= budget:
                uni_cost = sum(float(it.cost[-1][:, BITS.index(b) + (1 if it.kind != "experts" else 0)].sum())
                               for it in items)
                assert sol.cost <= uni_cost * (1 + 1e-9)


def test_solver_is_close_to_exhaustive_search_on_a_small_table():
    rng = np.random.default_rng(1)
    items = [_stack("s", 2, 8, 64, rng), _tensor("t", 8, 64, rng), _tensor("u", 16, 64, rng)]
    flat = []  # every joint choice: variant per item, option per member
    for it in items:
        flat.append([(v, combo) for v in range(len(it.variants))
                     for combo in itertools.product(range(len(it.variants[v])), repeat=it.cost[v].shape[0])])
    for budget in (400.0, 600.0, 900.0, 1500.0):
        best = np.inf
        for joint in itertools.product(*flat):
            nb = sum(it.nbytes[v][m, o] for it, (v, combo) in zip(items, joint) for m, o in enumerate(combo))
            if nb <= budget:
                best = min(best, sum(it.cost[v][m, o] for it, (v, combo) in zip(items, joint) for m, o in enumerate(combo)))
        sol = solve(items, budget)
        assert sol.nbytes <= budget
        assert sol.cost <= best * 1.5 + 1e-12  # Lagrangian + greedy fill: near the optimum on a coarse table


def test_solver_refuses_a_budget_below_the_smallest_choice():
    items = [_tensor("t", 8, 64, np.random.default_rng(0))]
    with pytest.raises(BudgetError, match="smallest choice"):
        solve(items, 10.0)


@pytest.mark.parametrize("arch, budget", [("MixtralForCausalLM", "3.1bpw"),
                                          ("SwitchTransformersForConditionalGeneration", "6bpw"),
                                          ("Qwen2MoeForCausalLM", "3.1bpw")])
def test_budget_plan_quantizes_to_the_planned_bytes(arch, budget):
    """Fused (Mixtral), per-expert (Switch) and shared-expert (Qwen2-MoE) layouts: every choice is honoured, so the
    quantized model's theoretical bytes are the plan's, within the budget by less than 1%."""
    model = tiny_random_model(arch, seed=0)
    plan = budget_plan(model, BudgetConfig(budget, bits=(2, 3, 4, 8), groups=(32, 64)))  # fewer candidates: quicker
    assert plan.version == BITPLAN_TENSORS_VERSION
    assert BitPlan.from_json(plan.to_json()).to_json() == plan.to_json()
    q = quantize_(model, MoEQuantConfig(plan=plan), progress=False)
    got = theoretical_model_bytes(q)
    assert got == pytest.approx(plan.budget["planned_bytes"], rel=1e-12)
    assert 0.99 * plan.budget["bytes"] <= got <= plan.budget["bytes"]
    # every tensor the plan lists is stored as it says
    from moe_export.models import find_moe_layers
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    params = dict(q.named_parameters(remove_duplicate=False))
    for layer in find_moe_layers(q):
        for proj in layer.projections:
            bits, g = plan.bits_for(layer.name, proj), plan.group_size_for(layer.name, proj)
            if layer.fused:
                p = params[layer.param_name(proj)]
                assert isinstance(p, MixedWidthExpertsTensor) and list(p.bit_widths) == bits and p.group_size == g
            else:
                for e, b in enumerate(bits):
                    p = params[layer.param_name(proj, e)]
                    assert isinstance(p, PackedLinearWeight) and p.bits == b and p.group_size == g
    for name, t in plan.tensors.items():
        p = params[name]
        if t == "float":
            assert not isinstance(p, PackedLinearWeight)
        else:
            assert isinstance(p, PackedLinearWeight) and (p.bits, p.group_size) == (t["bits"], t["group_size"])


def test_budget_plan_quantizes_a_tied_embedding_and_lm_head_as_one_tensor():
    """Switch (like T5) ties one embedding table among encoder, decoder and lm_head: the allocator gives it one width
    under every name, so budgets it would fill as float alone are met, and the quantized model stays tied."""
    from moe_export.tensors import PackedLinearWeight

    model = tiny_random_model("SwitchTransformersForConditionalGeneration", seed=0)
    tied = ["decoder.embed_tokens.weight", "encoder.embed_tokens.weight", "lm_head.weight", "shared.weight"]
    plan = budget_plan(model, BudgetConfig("3.1bpw", bits=(2, 3, 4, 8), groups=(32, 64)))
    choices = {json.dumps(plan.tensors[n], sort_keys=True) for n in tied}
    assert len(choices) == 1 and plan.tensors[tied[0]] != "float"
    q = quantize_(model, MoEQuantConfig(plan=plan), progress=False)
    got = theoretical_model_bytes(q)
    assert got == pytest.approx(plan.budget["planned_bytes"], rel=1e-12)
    assert 0.99 * plan.budget["bytes"] <= got <= plan.budget["bytes"]
    params = dict(q.named_parameters(remove_duplicate=False))
    assert isinstance(params["shared.weight"], PackedLinearWeight)
    assert all(params[n] is params["shared.weight"] for n in tied)


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "SwitchTransformersForConditionalGeneration"])
def test_fisher_weighting_measures_squared_gradients_and_meets_the_budget(arch):
    """weighting="fisher": the diagonal Fisher is the per-sequence squared gradient of the scored next-token loss
    (the model's parameters are left as they were), the table weights each element's error by it, and the plan
    quantizes to its planned bytes within the budget."""
    import torch

    from moe_export.eval import _score_from, logits_fn_for
    from moe_export.plan.budget import fisher_diagonal

    model = tiny_random_model(arch, seed=0)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    x = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))  # [B, S]
    F = fisher_diagonal(model, [x[:2], x[2:]])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before and not model.training
    lf, expected = logits_fn_for(model), {}
    for row in x:
        s = _score_from(lf, 16)
        loss = torch.nn.functional.cross_entropy(lf.logits(row[None])[0, s:-1], row[s + 1 :])
        params = dict(model.named_parameters())
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)):
            if g is not None:
                expected[n] = expected.get(n, 0) + g.square()
    for n, e in expected.items():
        torch.testing.assert_close(F[n], e)
    cfg = BudgetConfig("3.1bpw" if arch.startswith("Mixtral") else "6bpw", bits=(2, 3, 4, 8), groups=(32, 64),
                       weighting="fisher")
    with pytest.raises(BudgetError, match="calibration text"):
        budget_plan(model, cfg)
    plan = budget_plan(model, cfg, batches=[x])
    assert plan.provenance["weighting"] == "fisher" and "Fisher" in plan.provenance["expert_usage"]
    q = quantize_(model, MoEQuantConfig(plan=plan), progress=False)
    got = theoretical_model_bytes(q)
    assert got == pytest.approx(plan.budget["planned_bytes"], rel=1e-12)
    assert 0.99 * plan.budget["bytes"] <= got <= plan.budget["bytes"]


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "SwitchTransformersForConditionalGeneration"])
def test_activation_weighting_measures_input_moments_and_meets_the_budget(arch):
    """weighting="activation": each linear's input second moment in the proxy's units (mean variance 1), each
    expert's over its routed tokens (all experts of a projection together: top_k inputs per token), the error
    tr(dW H dW^T); the plan quantizes to its planned bytes within the budget."""
    import torch

    from moe_export.models import find_moe_layers
    from moe_export.plan.budget import input_moments, model_items
    from moe_export.plan.weight_error import reconstruction_error
    from moe_export.quant.base import get_quantizer

    model = tiny_random_model(arch, seed=0)
    x = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))  # [B, S]
    M = input_moments(model, [x[:2], x[2:]])
    name = next(n for n in M.linear if n.endswith("q.weight") or n.endswith("q_proj.weight"))
    seen = []
    mod = model.get_submodule(name.rsplit(".", 1)[0])
    h = mod.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    from moe_export.plan.calibration_stats import _run

    with torch.no_grad():
        _run(model, x)
    h.remove()
    X = torch.cat(seen)  # [T, K]
    H = X.T @ X / X.shape[0]
    torch.testing.assert_close(M.linear[name], (H * H.shape[0] / torch.trace(H)).float())
    for layer in find_moe_layers(model):
        for proj in layer.projections:
            Hs = [M.experts[(layer.name, proj, e)] for e in range(layer.num_experts)]
            assert sum(float(torch.trace(h)) for h in Hs) == pytest.approx(Hs[0].shape[0] * layer.top_k, rel=1e-5)
    W, q = model.get_parameter(name).detach(), get_quantizer("rtn")
    d = W - q.quantize(W, 2, 32, False).dequantize(torch.float32)
    items, _, _ = model_items(model, q, False, (2, 3), (32,), moments=M)
    it = next(i for i in items if i.names == [name])
    assert it.cost[0][0, it.variants[0].index((2, 32))] == pytest.approx(float(torch.trace(d @ M.linear[name] @ d.T)),
                                                                         rel=1e-4)
    assert reconstruction_error(W, 2, q, 32, False, moment=torch.eye(W.shape[1])) == pytest.approx(
        reconstruction_error(W, 2, q, 32, False), rel=1e-6)  # isotropic inputs: the raw error
    cfg = BudgetConfig("3.1bpw" if arch.startswith("Mixtral") else "6bpw", bits=(2, 3, 4, 8), groups=(32, 64),
                       weighting="activation")
    with pytest.raises(BudgetError, match="calibration text"):
        budget_plan(model, cfg)
    plan = budget_plan(model, cfg, batches=[x])
    assert plan.provenance["weighting"] == "activation"
    q = quantize_(model, MoEQuantConfig(plan=plan), progress=False)
    got = theoretical_model_bytes(q)
    assert got == pytest.approx(plan.budget["planned_bytes"], rel=1e-12)
    assert 0.99 * plan.budget["bytes"] <= got <= plan.budget["bytes"]


def test_version_two_fields_are_validated():
    model = tiny_random_model("MixtralForCausalLM", seed=0)
    d = json.loads(budget_plan(model, BudgetConfig("3bpw", bits=(2, 3, 4), groups=(64,))).to_json())
    bad = json.loads(json.dumps(d))
    bad["version"] = 1
    with pytest.raises(BitPlanError, match="version 1 bit plan has no 'tensors'"):
        BitPlan.from_dict(bad)
    bad = json.loads(json.dumps(d))
    proj = next(iter(bad["layers"][0]["tensors"]))
    bad["layers"][0]["tensors"][proj]["bits"][0] = 5
    with pytest.raises(BitPlanError, match="not one of the plan's levels|widest projection"):
        BitPlan.from_dict(bad)
    bad = json.loads(json.dumps(d))
    bad["tensors"][next(iter(bad["tensors"]))] = {"bits": 9, "group_size": 32, "symmetric": False}
    with pytest.raises(BitPlanError, match="outside 1-8"):
        BitPlan.from_dict(bad)


def test_cli_budget_plan_then_quantize_stays_within_one_percent(tiny_zoo_dir, tmp_path):
    """The issue's check: `moe-export plan MODEL --budget ...` on the tiny model, then quantize: the stored bytes
    are within 1% of the budget; the heatmap shows the choices; a per-layer plan of the same model is version 1."""
    from moe_export.cli import main

    runner = CliRunner()
    plan_path, heat = tmp_path / "plan.json", tmp_path / "plan.png"
    r = runner.invoke(main, ["plan", str(tiny_zoo_dir), "--budget", "2.7bpw", "-o", str(plan_path), "--heatmap",
                             str(heat), "-q"])
    assert r.exit_code == 0, r.output
    assert heat.stat().st_size > 0
    plan = BitPlan.load(plan_path)
    assert plan.provenance["method"] == "budget" and plan.budget["bits_per_weight"] == 2.7
    r = runner.invoke(main, ["quantize", str(tiny_zoo_dir), "--plan", str(plan_path), "-o", str(tmp_path / "q"), "-q"])
    assert r.exit_code == 0, r.output
    assert "bits/weight whole model, budget 2.7)" in r.output  # not the derived expert mean of a per-layer plan
    from moe_export.hf import load_quantized

    q = load_quantized(tmp_path / "q")
    got = theoretical_model_bytes(q)
    assert 0.99 * plan.budget["bytes"] <= got <= plan.budget["bytes"]
    assert got == pytest.approx(plan.budget["planned_bytes"], rel=1e-12)
    # the out-of-core path reads the same per-tensor choices: the same model, logit for logit
    r = runner.invoke(main, ["quantize", str(tiny_zoo_dir), "--plan", str(plan_path), "-o", str(tmp_path / "s"), "-q",
                             "--streaming"])
    assert r.exit_code == 0, r.output
    s = load_quantized(tmp_path / "s")
    assert theoretical_model_bytes(s) == got
    import torch

    x = torch.randint(0, q.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(q(x).logits, s(x).logits)
    r = runner.invoke(main, ["plan", str(tiny_zoo_dir), "--budget", "2.7bpw", "--avg-bits", "2", "-o", str(plan_path)])
    assert r.exit_code != 0 and "not both" in r.output
    r = runner.invoke(main, ["plan", str(tiny_zoo_dir), "--budget", "1KB", "-o", str(plan_path)])
    assert r.exit_code != 0 and "kept float" in r.output


def test_cli_plan_default_is_the_calibrated_inputs_budget_and_the_paper_stays_per_layer(tiny_zoo_dir, tmp_path):
    """`plan --budget SIZE` with no --usage weighs every error by its measured inputs on the default calibration text
    (the best measured default); --usage uniform is the data-free allocation; --avg-bits with no --method is still
    the paper's router+maxvar."""
    from moe_export.cli import main

    runner = CliRunner()
    plans = {}
    for name, extra in (("default", []), ("activation", ["--usage", "activation", "--calib-corpus", "shakespeare"]),
                        ("uniform", ["--usage", "uniform"])):
        r = runner.invoke(main, ["plan", str(tiny_zoo_dir), "--budget", "2.7bpw", "-q", "-o",
                                 str(tmp_path / f"{name}.json"), *extra])
        assert r.exit_code == 0, r.output
        plans[name] = BitPlan.load(tmp_path / f"{name}.json")
    d = plans["default"].provenance
    assert d["method"] == "budget" and d["weighting"] == "activation"
    assert d["expert_usage"] == "calibration input second moments (output error)"
    assert d["calibration"].startswith("shakespeare: ")
    assert plans["default"].tensors == plans["activation"].tensors
    assert [l.tensors for l in plans["default"].layers] == [l.tensors for l in plans["activation"].layers]
    u = plans["uniform"].provenance
    assert u["weighting"] == "usage" and u["expert_usage"] == "top_k / E" and "calibration" not in u
    r = runner.invoke(main, ["plan", str(tiny_zoo_dir), "--avg-bits", "2.5", "--levels", "3,2", "--group-size", "32",
                             "-q", "-o", str(tmp_path / "paper.json")])
    assert r.exit_code == 0, r.output
    assert BitPlan.load(tmp_path / "paper.json").provenance["method"] == "router+maxvar"
    r = runner.invoke(main, ["plan", str(tiny_zoo_dir), "-o", str(tmp_path / "none.json")])
    assert r.exit_code != 0 and "--budget SIZE" in r.output


def test_budget_sweep_section_is_spliced_and_kept_by_the_report(tmp_path):
    """The sweep's section of results.md: rendered from its records, replaced in place on a rerun, appended once."""
    from moe_export.repro import budget_sweep

    pts = [{"method": m, "target_bpw": 2.7, "bpw": bpw, "bytes": bpw * 100 / 8, "bpb": bpb, "ppl": ppl}
           for m, bpw, bpb, ppl in [("router+maxvar", 2.69, 2.90, 120.0), ("weight-error", 2.69, 2.86, 114.0),
                                    ("budget", 2.70, 2.85, 112.0), ("budget-matched", 2.69, 2.85, 111.0)]]
    pts.append({"method": "uniform", "target_bpw": 3.0, "bits": 3, "bpw": 3.5, "bytes": 44.0, "bpb": 2.8, "ppl": 100.0})
    results = {"sweep": budget_sweep.BudgetSweep(models=("m",), targets=(2.7,)).to_dict(),
               "runs": [{"model": "m", "seed": 0, "parameters": 100, "group_size": 64, "points": pts,
                         "float": {"bpb": 2.7, "ppl": 93.0, "bpw": 32.0}}], "note": "A note."}
    section = budget_sweep.markdown(results)
    text = "\n".join(section)
    assert section[0] == budget_sweep.SECTION and "A note." in text
    assert "| 2.7 |" in text and "**2.690 / 2.8500 / 111.000 (+19.4%)**" in text
    assert "better by 0.0100 bits per byte" in text  # matched budget against weight-error at the same bytes
    before = "# Title\n\n## 1. A\n\ntext\n"
    once = budget_sweep.splice(before, section)
    assert once.startswith(before) and budget_sweep.splice(once, section) == once
    assert budget_sweep.splice(once + "\n## 4. Later\n\nmore\n", ["## 3. One byte budget for the whole model", "", "new"]) \
        .endswith("## 3. One byte budget for the whole model\n\nnew\n## 4. Later\n\nmore\n")


def test_budget_sweep_merges_models_and_states_the_quality_targets():
    """A sweep of one model keeps the other models' runs in the records; each quality target is stated met or not."""
    from moe_export.repro import budget_sweep

    def run(model, ppl):
        pts = [{"method": "budget", "target_bpw": 2.7, "bpw": 2.70, "bytes": 33.75, "bpb": 2.8, "ppl": ppl},
               {"method": "budget-none", "target_bpw": 2.2, "bpw": 2.20, "bytes": 27.5, "bpb": 2.9, "ppl": 110.0},
               {"method": "budget-matched", "target_bpw": 2.2, "bpw": 2.25, "bytes": 28.1, "bpb": 2.7, "ppl": 100.0}]
        return {"model": model, "seed": 0, "parameters": 100, "group_size": 64, "points": pts,
                "float": {"bpb": 2.7, "ppl": 100.0, "bpw": 32.0}}

    sweep = lambda models: json.loads(json.dumps(budget_sweep.BudgetSweep(models=models, targets=(2.7, 2.2)).to_dict()))
    old = {"sweep": sweep(("a", "b")), "runs": [run("a", 101.0), run("b", 150.0)], "command": "sweep a,b"}
    new = {"sweep": sweep(("b",)), "runs": [run("b", 101.0)], "commands": {"b": "sweep b"}}
    merged = budget_sweep.merge(old, new)
    assert [(r["model"], r["points"][0]["ppl"]) for r in merged["runs"]] == [("a", 101.0), ("b", 101.0)]
    assert merged["sweep"]["models"] == ["a", "b"] and merged["commands"] == {"a": "sweep a,b", "b": "sweep b"}
    text = "\n".join(budget_sweep.markdown(merged))
    assert "`sweep a,b`, `sweep b`" in text
    assert "quality target at 2.7 bpw, perplexity within 1.5% of float: met;" in text  # +1.0%
    # at 2.2 the matched plan (2.25 bpw) is over the size: only the 2.20 bpw point counts, +10.0%
    assert "quality target at 2.2 bpw, perplexity within 5% of float: not met;" in text and "(+10.0%)" in text
    with pytest.raises(ValueError, match="eval_tokens"):
        budget_sweep.merge(old, {**new, "sweep": {**new["sweep"], "eval_tokens": 1}})


def test_budget_sweep_resumed_run_keeps_its_commands_and_note():
    """A model's sweep resumed from its recorded points (every old point kept) lists the old command and the new
    one, and keeps the records' note; the variant calibrated on other text than the scored domain says so."""
    from moe_export.repro import budget_sweep

    pt = lambda m, t, ppl: {"method": m, "target_bpw": t, "bpw": t, "bytes": t * 100 / 8, "bpb": 2.8, "ppl": ppl}
    sweep = json.loads(json.dumps(budget_sweep.BudgetSweep(models=("b",), targets=(2.7, 2.2)).to_dict()))
    run = lambda pts: {"model": "b", "seed": 0, "parameters": 100, "group_size": 64, "points": pts,
                       "float": {"bpb": 2.7, "ppl": 100.0, "bpw": 32.0}}
    old = {"sweep": sweep, "runs": [run([pt("budget", 2.7, 101.0)])], "commands": {"b": "sweep one"}, "note": "N."}
    grown = [pt("budget", 2.7, 101.0), pt("budget-activation-shakespeare", 2.2, 103.0)]
    merged = budget_sweep.merge(old, {"sweep": sweep, "runs": [run(grown)], "commands": {"b": "sweep two"}})
    assert merged["commands"] == {"b": ["sweep one", "sweep two"]} and merged["note"] == "N."
    text = "\n".join(budget_sweep.markdown(merged))
    assert "Written by `sweep one`, `sweep two`." in text and "\nN.\n" in text
    assert "| budget allocator (calibrated inputs on Shakespeare, plan's default text) |" in text
    assert "*Calibrated inputs on Shakespeare*" in text
    changed = budget_sweep.merge(old, {"sweep": sweep, "runs": [run([pt("budget", 2.7, 99.0)])],
                                       "commands": {"b": "sweep three"}})
    assert changed["commands"] == {"b": "sweep three"}
    # a sweep of other sizes and no uniform points adds its targets; the table gets a row for each
    other = {**sweep, "targets": [3.2], "uniform": []}
    grown = budget_sweep.merge(old, {"sweep": other, "runs": [run([pt("budget", 2.7, 101.0), pt("budget", 3.2, 100.5)])]})
    assert grown["sweep"]["targets"] == [2.7, 2.2, 3.2] and grown["sweep"]["uniform"] == [2, 3, 4]
    assert "| 3.2 | **3.200 / 2.8000 / 100.500 (+0.5%)** |" in "\n".join(budget_sweep.markdown(grown))


def test_error_table_scores_experts_with_the_plans_quantizer_and_the_rest_as_stored():
    """The table judges each expert width by the grid the plan's quantizer stores: HQQ's, or GPTQ's quantized
    against the expert's measured input moment and scored on it (GPTQ cannot be scored without inputs); non-expert
    weights by the quantizer that stores them (GPTQ for a measured linear under GPTQ, RTN otherwise). A GPTQ budget
    plan quantizes with GPTQ to its planned bytes."""
    import torch

    from moe_export.models import find_moe_layers
    from moe_export.plan.budget import input_moments, model_items
    from moe_export.quant.apply import non_expert_quantizer
    from moe_export.quant.base import get_quantizer
    from moe_export.quant.calibration import CalibrationConfig

    model = tiny_random_model("MixtralForCausalLM", seed=0)
    x = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))  # [B, S]
    M = input_moments(model, [x[:2], x[2:]])
    layer = find_moe_layers(model)[0]
    proj = layer.projections[0]
    W, H = layer.expert_weight(proj, 1).detach(), M.experts[(layer.name, proj, 1)]  # [N, K], [K, K]
    gptq, hqq = get_quantizer("gptq"), get_quantizer("hqq")
    with pytest.raises(BudgetError, match="needs them"):
        model_items(model, gptq, False, (2,), (32,))
    for quantizer, moments in ((gptq, M), (hqq, None)):
        items, _, _ = model_items(model, quantizer, False, (2, 3), (32,), moments=moments)
        stack = next(i for i in items if i.key == f"{layer.name}.{proj}")
        q = quantizer.quantize(W, 2, 32, False, hessian=H if quantizer is gptq else None).dequantize(torch.float32)
        d = W - q  # [N, K]
        want = float(torch.trace(d @ H @ d.T)) if quantizer is gptq else float(d.square().sum())
        assert stack.cost[0][1, 0] == pytest.approx(want, rel=1e-4)
        rtn = non_expert_quantizer()
        assert rtn.name == "rtn"
        it = next(i for i in items if i.kind == "attention")
        A = model.get_parameter(it.names[0]).detach()
        if quantizer is gptq:  # GPTQ stores the linears it measured inputs for too (api.quantize_)
            d = A - gptq.quantize(A, 2, 32, False, hessian=M.linear[it.names[0]]).dequantize(torch.float32)
        else:
            d = A - rtn.quantize(A, 2, 32, False).dequantize(torch.float32)
        o = it.variants[0].index((2, 32))
        want = float(torch.trace(d @ M.linear[it.names[0]] @ d.T)) if moments is not None else float(d.square().sum())
        assert it.cost[0][0, o] == pytest.approx(want, rel=1e-4)
    cfg = BudgetConfig("3.1bpw", bits=(2, 3, 4, 8), groups=(32, 64), weighting="activation", quantizer="gptq")
    plan = budget_plan(model, cfg, batches=[x])
    assert plan.quantizer.name == "gptq"
    q = quantize_(model, MoEQuantConfig(plan=plan, quantizer="gptq", calibration=CalibrationConfig(batches=x)),
                  progress=False)
    got = theoretical_model_bytes(q)
    assert got == pytest.approx(plan.budget["planned_bytes"], rel=1e-12)
    assert 0.99 * plan.budget["bytes"] <= got <= plan.budget["bytes"]
    with pytest.raises(BudgetError, match="needs them"):
        budget_plan(model, BudgetConfig("3.1bpw", bits=(2, 3), groups=(32,), quantizer="gptq"))


def test_budget_sweep_names_the_quantizer_and_compares_like_with_like():
    """``method@q`` stores the experts with q (``@scorer:q``: widths scored by another quantizer's error); the
    section gets one table per quantizer, and each budget variant is compared with the per-layer methods whose
    experts the same quantizer stores."""
    from moe_export.repro import budget_sweep

    assert budget_sweep.quantizers_of("maxvar") == ("maxvar", "rtn", "rtn")
    assert budget_sweep.quantizers_of("budget-activation@gptq") == ("budget-activation", "gptq", "gptq")
    assert budget_sweep.quantizers_of("budget-activation@rtn:gptq") == ("budget-activation", "rtn", "gptq")
    assert budget_sweep.label("budget-activation@rtn:gptq") == \
        "budget allocator (calibrated inputs), widths by RTN error, + GPTQ"
    pts = [{"method": m, "target_bpw": 2.7, "bpw": bpw, "bytes": bpw * 100 / 8, "bpb": bpb, "ppl": ppl}
           for m, bpw, bpb, ppl in [("maxvar", 2.70, 2.90, 120.0), ("maxvar@gptq", 2.70, 2.80, 105.0),
                                    ("budget-activation", 2.70, 2.85, 110.0),
                                    ("budget-activation@gptq", 2.70, 2.75, 101.0)]]
    results = {"sweep": budget_sweep.BudgetSweep(models=("m",), targets=(2.7,)).to_dict(),
               "runs": [{"model": "m", "seed": 0, "parameters": 100, "group_size": 64, "points": pts,
                         "float": {"bpb": 2.7, "ppl": 100.0, "bpw": 32.0}}]}
    text = "\n".join(budget_sweep.markdown(results))
    assert "Experts quantized with RTN:" in text and "Experts quantized with GPTQ:" in text
    assert "| target bpw | MaxVar + GPTQ | budget allocator (calibrated inputs) + GPTQ |" in text
    # RTN against RTN (2.85 vs 2.90), GPTQ against GPTQ (2.75 vs 2.80): never across quantizers
    assert "budget allocator (calibrated inputs) 2.700 bpw, bpb 2.8500" in text and "MaxVar 2.700 bpw" in text
    assert "better by 0.0500 bits per byte" in text and "worse" not in text
    assert "quality target at 2.7 bpw, perplexity within 1.5% of float: met;" in text  # the GPTQ point, +1.0%


def test_budget_sweep_reports_several_seeds_as_mean_and_sd_and_counts_the_seeds_that_agree(tmp_path):
    """A sweep of other build seeds adds to a model's recorded seeds (its old commands stay); the section shows each
    cell as mean ± sd over the seeds (n=k where fewer were measured), compares budget and per-layer plans seed by
    seed and says on how many seeds each verdict holds; one seed's section has no spread."""
    from moe_export.repro import budget_sweep

    floats = {0: (2.30, 100.0), 1: (2.32, 102.0), 2: (2.31, 101.0)}
    # method -> target -> per seed (bpb, ppl); bpw 2.696 for every point (the paper plan's bytes)
    table = {"maxvar": {2.7: [(2.40, 110.0), (2.41, 112.0), (2.42, 114.0)]},
             "router+maxvar": {2.7: [(2.45, 120.0), (2.46, 121.0), (2.47, 122.0)]},
             "budget-activation-matched": {2.7: [(2.38, 101.0), (2.42, 103.6), (2.39, 101.5)]},
             "maxvar@gptq": {2.7: [(2.35, 100.5)]},  # seed 0 only
             "budget-activation-matched@rtn:gptq": {2.7: [(2.34, 100.2)]}}

    def run(seed):
        pts = [{"method": m, "target_bpw": t, "bpw": 2.696, "bytes": 2.696 * 100 / 8, "bpb": v[seed][0],
                "ppl": v[seed][1]} for m, by_t in table.items() for t, v in by_t.items() if seed < len(v)]
        return {"model": "m", "seed": seed, "parameters": 100, "group_size": 64, "points": pts,
                "float": {"bpb": floats[seed][0], "ppl": floats[seed][1], "bpw": 32.0}}

    sweep = lambda seeds: json.loads(json.dumps(budget_sweep.BudgetSweep(models=("m",), seeds=seeds,
                                                                         targets=(2.7,)).to_dict()))
    old = {"sweep": sweep((0,)), "runs": [run(0)], "commands": {"m": "sweep s0"}}
    single = "\n".join(budget_sweep.markdown(old))
    assert "±" not in single and "n=" not in single and "of 3 seeds" not in single
    merged = budget_sweep.merge(old, {"sweep": sweep((1, 2)), "runs": [run(2), run(1)], "commands": {"m": "sweep s1,2"}})
    assert sorted(r["seed"] for r in merged["runs"]) == [0, 1, 2] and merged["sweep"]["seeds"] == [0, 1, 2]
    assert merged["commands"] == {"m": ["sweep s0", "sweep s1,2"]}
    text = "\n".join(budget_sweep.markdown(merged))
    assert "float32: bpb 2.3100 ± 0.0100, perplexity 101.000 ± 1.000; mean ± sd over build seeds 0, 1, 2, n=3" in text
    # bpb 2.38, 2.42, 2.39: mean 2.3967, sd 0.0208; perplexity change from each seed's float: +1.0, +1.6, +0.5%
    assert "| **2.696 / 2.3967 ± 0.0208 / 102.033 (+1.0 ± 0.5%)** |" in text
    assert "| 2.696 / 2.4100 ± 0.0100 / 112.000 (+10.9 ± 1.7%) |" in text  # MaxVar (+10.0, +9.8, +12.9%), not bold
    # the seed-0-only GPTQ cells say so; bold among them (no cell of more seeds in that row)
    assert "| **2.696 / 2.3400 / 100.200 (+0.2%) [n=1: seed 0]** | 2.696 / 2.3500 / 100.500 (+0.5%) [n=1: seed 0] |" \
        in text or "| 2.696 / 2.3500 / 100.500 (+0.5%) [n=1: seed 0] | **2.696 / 2.3400 / 100.200 (+0.2%) [n=1: seed 0]** |" in text
    # paired per seed against MaxVar: -0.02, +0.01, -0.03 -> better by 0.0133 ± 0.0208, better on seeds 0 and 2
    assert ("- target 2.7 (3 seeds): budget allocator (calibrated inputs) at the paper plan's bytes 2.696 bpw, bpb "
            "2.3967 ± 0.0208 (perplexity +1.0 ± 0.5% from float) against the best per-layer method at as many or more "
            "bytes, MaxVar 2.696 bpw, bpb 2.4100 ± 0.0100: better by 0.0133 ± 0.0208 bits per byte; better than every "
            "per-layer method on 2 of 3 seeds.") in text
    assert ("- target 2.7 (seed 0): budget allocator (calibrated inputs) at the paper plan's bytes, widths by RTN error, "
            "+ GPTQ 2.696 bpw, bpb 2.3400 (perplexity +0.2% from float) against the best per-layer method at as many or "
            "more bytes, MaxVar + GPTQ 2.696 bpw, bpb 2.3500: better by 0.0100 bits per byte.") in text
    # the quality target on the mean (+1.0%) and per seed (+1.6% on seed 1 misses 1.5%); the GPTQ plan, on seed 0 only
    assert ("- quality target at 2.7 bpw, perplexity within 1.5% of float (3 seeds): met on the mean, met on 2 of 3 "
            "seeds; the best whole-model plan at or under 2.7 bpw is budget allocator (calibrated inputs) at the paper "
            "plan's bytes, 2.696 bpw, perplexity 102.033 (+1.0 ± 0.5%); measured on fewer seeds (seed 0), budget "
            "allocator (calibrated inputs) at the paper plan's bytes, widths by RTN error, + GPTQ is +0.2% against "
            "the plan above's +1.0% on the same seed.") in text
    assert "Where a model has several build seeds" in text and "Where a model has several" not in single
    budget_sweep.plot(merged, tmp_path / "several.png")  # error bars over the seeds
    assert (tmp_path / "several.png").stat().st_size > 0
    # a rerun of seed 1 replaces that seed's run and keeps the others
    rerun = budget_sweep.merge(merged, {"sweep": sweep((1,)), "runs": [run(1)], "commands": {"m": "sweep s1"}})
    assert sorted(r["seed"] for r in rerun["runs"]) == [0, 1, 2] and rerun["commands"]["m"][-1] == "sweep s1"
