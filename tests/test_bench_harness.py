"""The benchmark harness on a random tiny Mixtral: it runs every runtime and writes well-formed JSON and
markdown. No timing is asserted (the CPU is shared); only that each variant produced a positive median."""

import json
import math

import pytest
import torch

from moe_export.bench import latency, roofline
from moe_export.bench.peers import LinearExperts


def test_interleaved_median_and_errors():
    calls = []
    rows = latency.interleaved({"a": lambda: calls.append("a"), "b": lambda: 1 / 0}, reps=5, warmup=1, progress=False)
    assert rows["a"]["n"] == 5 and rows["a"]["ms"] >= 0
    assert calls.count("a") == 1 + 1 + 5  # first call + warm-up + timed
    assert rows["b"]["error"].startswith("ZeroDivisionError")
    with pytest.raises(ValueError, match="reps"):
        latency.interleaved({"a": lambda: None}, reps=0)


def test_interleaved_budget_cuts_only_slow_variants():
    import time

    calls = {"fast": 0, "slow": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)

    rows = latency.interleaved({"fast": lambda: calls.__setitem__("fast", calls["fast"] + 1), "slow": slow}, reps=20,
                               warmup=2, progress=False, budget_s=0.1)
    assert rows["fast"]["n"] == 20 and calls["fast"] == 1 + 2 + 20
    assert latency.MIN_REPS <= rows["slow"]["n"] <= 5  # 0.1 s of 20 ms calls, at least MIN_REPS
    assert calls["slow"] == 1 + 1 + rows["slow"]["n"]  # one warm-up call once it is known to be slow
    rows = latency.interleaved({"slower": lambda: time.sleep(0.06)}, reps=20, progress=False, budget_s=0.1, burst=3)
    assert rows["slower"]["n"] == 1  # 3 calls would not fit the budget: one timed call, no burst


def test_interleaved_burst_times_warm_calls_back_to_back():
    order = []
    rows = latency.interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=2, warmup=0,
                               progress=False, burst=3)
    assert rows["a"]["n"] == rows["b"]["n"] == 6
    # first calls, then per round: a (untimed + 3 timed), b (same)
    assert order == ["a", "b"] + (["a"] * 4 + ["b"] * 4) * 2


def test_parse_non_expert():
    from moe_export.bench.run import DEFAULT_NON_EXPERT
    from moe_export.plan.bitplan import NonExpertPolicy

    def parse_non_expert(spec, group_size):  # the plan's non_expert entries of the roles given a width
        return {r: q.to_dict() for r, q in NonExpertPolicy.parse(spec, group_size).quantized().items()}

    assert parse_non_expert(DEFAULT_NON_EXPERT, 128) == {
        "attention": {"bits": 4, "group_size": 128, "symmetric": False},
        "lm_head": {"bits": 8, "group_size": None, "symmetric": True}}
    assert parse_non_expert("attention=3:32:sym", 64) == {"attention": {"bits": 3, "group_size": 32, "symmetric": True}}
    assert parse_non_expert("float", 64) == {} and parse_non_expert(None, 64) == {}
    for bad in ("attn=4", "attention=x", "attention=4:big", "attention"):
        with pytest.raises(ValueError, match="non-expert item"):
            parse_non_expert(bad, 64)
    # the plan command's repeated option reads the same syntax, with its own group size and grid as defaults
    assert NonExpertPolicy.parse(["attention=4", "router=float", "lm_head=8:row"], 32, True).to_dict() == {
        **NonExpertPolicy().to_dict(), "attention": {"bits": 4, "group_size": 32, "symmetric": True},
        "lm_head": {"bits": 8, "group_size": None, "symmetric": True}}


def test_bytes_per_decoded_token_counts_quantized_non_expert_weights():
    from moe_export.model_configs import tiny_random_model
    from moe_export.models import find_moe_layers
    from moe_export.plan.bitplan import BitPlan
    from moe_export.size import theoretical_bytes

    model = tiny_random_model("MixtralForCausalLM")
    cfg = model.config
    plan = BitPlan.uniform(find_moe_layers(model), 4, group_size=32)
    base = roofline.bytes_per_decoded_token(model, plan)
    plan.non_expert = {**plan.non_expert, "lm_head": {"bits": 8, "group_size": None, "symmetric": True}}
    q = roofline.bytes_per_decoded_token(model, plan)
    v, h = cfg.vocab_size, cfg.hidden_size
    assert base["non_expert"] - q["non_expert"] == pytest.approx(v * h * 4 - theoretical_bytes(v, h, 8, None, True))
    assert q["routed_experts"] == base["routed_experts"]


def test_own_code_gives_each_compiled_variant_its_cache():
    from moe_export.bench.run import _own_code

    a, b = _own_code(torch.nn.Linear(4, 4)), _own_code(torch.nn.Linear(4, 4))
    assert type(a).forward.__code__ is not type(b).forward.__code__
    assert isinstance(a, torch.nn.Linear) and torch.equal(a(torch.ones(1, 4)), torch.nn.functional.linear(torch.ones(1, 4), a.weight, a.bias))


def test_linear_experts_match_fused_experts():
    from moe_export.model_configs import tiny_random_model

    model = tiny_random_model("MixtralForCausalLM")
    block = model.model.layers[0].mlp
    x = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        ref = block(x)
        block.experts = LinearExperts(block.experts)
        out = block(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_bytes_per_decoded_token_counts_routed_experts():
    from moe_export.model_configs import tiny_random_model
    from moe_export.plan.bitplan import BitPlan
    from moe_export.models import find_moe_layers

    model = tiny_random_model("MixtralForCausalLM")
    cfg = model.config
    f = roofline.bytes_per_decoded_token(model)
    per_expert = 3 * cfg.hidden_size * cfg.intermediate_size * 4
    assert f["routed_experts"] == cfg.num_hidden_layers * cfg.num_experts_per_tok * per_expert
    plan = BitPlan.uniform(find_moe_layers(model), 4, group_size=32)
    q = roofline.bytes_per_decoded_token(model, plan)
    assert q["non_expert"] == f["non_expert"]
    assert 0.12 < q["routed_experts"] / f["routed_experts"] < 0.2  # 4/32 bits + scales and zeros
    bw = roofline.measure_bandwidth(16, reps=2)
    assert bw["GBps"] > 0 and math.isfinite(bw["GBps"])
    # in-round form: each call's fastest round, bytes counted as measure_bandwidth counts them (copy: read + write)
    calls = roofline.bandwidth_calls(16, passes=2)
    assert calls["sum"][1] == 2 * 16 * (1 << 20) and calls["copy"][1] == 2 * calls["sum"][1]
    calls["sum"][0](), calls["copy"][0]()
    timed = {"sum": {"min_ms": 2.0, "ms": 3.0, "n": 3}, "copy": {"min_ms": 8.0, "ms": 9.0, "n": 3}}
    got = roofline.bandwidth_from_rounds(timed, calls, 16)
    assert got["sum_GBps"] == pytest.approx(calls["sum"][1] / 2e-3 / 1e9)
    assert got["copy_GBps"] == pytest.approx(calls["copy"][1] / 8e-3 / 1e9)
    assert got["GBps"] == got["sum_GBps"] and got["in_rounds"] and got["rounds"] == 3


def test_run_bench_eager_only_writes_json_and_markdown(tmp_path):
    """Default-suite version: eager runtimes, no export/compile/subprocesses (those are in the slow test)."""
    from moe_export.bench.run import run_bench
    from moe_export.model_configs import tiny_random_model

    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    res = run_bench(model, tmp_path, quick=True, reps=3, targets=(), compile=False, peers=False, offline=False, rss=False,
                    progress=False, echo=lambda *_: None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["settings"]["baseline"] == "float eager"
    assert data["settings"]["command"].endswith(" --no-export")  # what reproduces a run without exports
    dec = data["latency"]["decode"]
    assert set(dec) == {"float eager", "quantized eager"}
    from moe_export.bench.run import BURST

    assert all(dec[n]["ms"] > 0 and dec[n]["n"] == 3 * BURST for n in dec)
    assert dec["float eager"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert data["latency"]["prefill"]["quantized eager"]["ms"] > 0
    assert data["block"]["decode"]["quantized eager"]["ms"] > 0
    assert 0 < dec["quantized eager"]["pct_of_roofline"]
    sizes = {r["artifact"]: r for r in data["sizes"]}
    q = sizes["quantized checkpoint"]
    assert q["bytes"] < sizes["float HF checkpoint"]["bytes"] and q["vs_theoretical"] > 0.9
    md = (tmp_path / "results.md").read_text()
    assert "| quantized eager |" in md and "## Roofline" in md and "## Targets" in md
    assert any("quantized checkpoint" in t["target"] for t in res["targets"])
    pl = data["plan"]  # the default bench plan quantizes attention (4 bits) and lm_head (8 bits), and says so
    assert set(pl["non_expert"]) == {"attention", "lm_head"} and pl["mean_bits"] <= 3
    assert pl["expert_bits_per_weight"] > pl["mean_bits"] and 0 < pl["model_bits_per_weight"] < 32
    assert "attention 4-bit" in md and "lm_head 8-bit per-row sym" in md and "bits a weight" in md
    assert data["roofline"]["bytes_quantized"]["non_expert"] < data["roofline"]["bytes_float"]["non_expert"]
    # the machine's load is recorded beside the times, since other jobs inflate them
    assert data["settings"]["load_avg_start"] >= 0 and data["settings"]["load_avg_end"] >= 0
    assert f"on {data['settings']['cpus']} CPUs" in md
    # llama-bench's protocol at 1 and 2 threads: 64 greedy steps from an empty cache, 128-token prefill
    tp = data["throughput"]
    assert tp["decode_steps"] == 64 and tp["prefill_tokens"] == 128 and set(tp["threads"]) == {"1", "2"}
    for t, rows in tp["threads"].items():
        assert set(rows) == {"float eager", "quantized eager"}
        for r in rows.values():
            assert r["decode_tok_s"] == pytest.approx(64 / r["decode_s"]) and r["prefill_tok_s"] > 0
            assert 0 < r["pct_of_dram_limit"] and 0 < r["pct_of_cache_limit"]
        assert tp["roofline"][t]["GBps"] > 0
        # the DRAM limit of a thread count is timed in its decode rounds (its turns are not rows of the table)
        assert tp["bandwidth"][t]["in_rounds"] and tp["bandwidth"][t]["rounds"] == 3
        assert tp["roofline"][t]["GBps"] == tp["bandwidth"][t]["GBps"] and tp["roofline"][t]["in_rounds"]
        q = rows["quantized eager"]
        assert q["pct_of_dram_limit"] == pytest.approx(100 * q["read_GBps"] / tp["bandwidth"][t]["GBps"])
    assert "## Throughput (llama-bench protocol)" in md and "| quantized eager | 2 |" in md
    assert "measured in the decode rounds themselves" in md and "DRAM bandwidth" not in md.split("## Throughput")[1]
    assert data["settings"]["kernel_path"] and f"CPU kernels {data['settings']['kernel_path']}" in md
    llc = data["roofline"]["llc_bytes"]
    assert llc is None or llc > 1 << 20
    assert "Last-level cache" in md


@pytest.mark.slow
def test_run_bench_writes_json_and_markdown(tmp_path):
    from moe_export.bench.run import run_bench
    from moe_export.model_configs import tiny_random_model

    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    docs = tmp_path / "benchmarks.md"
    res = run_bench(model, tmp_path / "out", quick=True, reps=2, offline=True, rss=True, docs=docs, progress=False,
                    pte_modes=("packed", "xnnpack-int"), echo=lambda *_: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["plan"]["mean_bits"] <= 3
    dec = data["latency"]["decode"]
    for name in ("float eager", "float compiled", "quantized eager", "quantized compiled", "quantized AOTInductor",
                 "pte quantized (packed)", "pte quantized (xnnpack-int)", "pte float (xnnpack)", "onnx quantized (packed)", "onnx quantized (fast)",
                 "onnx float", "torchao intx-wo int4 g32 eager"):
        assert dec[name]["ms"] > 0, (name, dec[name])
        assert data["latency"]["prefill"][name]["ms"] > 0, name
    assert dec["float compiled"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert data["block"]["decode"]["quantized compiled"]["ms"] > 0
    assert 0 < dec["quantized compiled"]["pct_of_roofline"]
    sizes = {r["artifact"]: r for r in data["sizes"]}
    assert sizes["pte quantized (packed)"]["bytes"] < sizes["pte float (xnnpack)"]["bytes"]
    assert sizes["pte quantized (packed)"]["rss"]["peak_MB"] > 0
    assert data["parity"]["onnx quantized (fast)"]["approximate"] and not data["parity"]["onnx quantized (packed)"]["approximate"]
    assert data["parity"]["pte quantized (packed)"]["max_rel_err_vs_eager"] < 1e-4
    assert data["step_profile"]["quantized compiled"]["weight_kernels_ms"] > 0
    assert {r["quantizer"] for r in data["offline"]["quantize"] if r.get("weights_per_s", 0) > 0} == {"rtn", "hqq", "gptq"}
    md = docs.read_text()
    assert md == (tmp_path / "out" / "results.md").read_text()
    for heading in ("## Whole model", "## One MoE block", "## Roofline", "## Size and peak memory", "## Offline costs",
                    "## Targets"):
        assert heading in md
    assert res["targets"]


def test_fast_export_forms_take_the_quantized_non_expert_linears():
    """The bench plan quantizes attention and lm_head: the speed export forms must give those the fast kernel
    too (left as in-graph unpacks they would dequantize the whole weight every step). Eager forms only."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.bench.run import DEFAULT_NON_EXPERT
    from moe_export.plan.bitplan import NonExpertPolicy
    from moe_export.export.fast import NBitsLinear, to_nbits_experts, to_xnnpack_int_experts
    from moe_export.export.parity import sqnr
    from moe_export.export.prepare import PackedLinear, prepare_for_export
    from moe_export.export.wrapper import DecoderStep
    from moe_export.model_configs import tiny_random_model
    from tests._mixed_plans import mixed_plan

    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    plan = mixed_plan(model, widths=(3, 2))
    plan.non_expert = NonExpertPolicy.parse(DEFAULT_NON_EXPERT, 32).to_dict()
    quantize_(model, MoEQuantConfig(plan), progress=False)
    step = DecoderStep(prepare_for_export(model), 16)
    n_packed = sum(isinstance(m, PackedLinear) for m in step.modules())
    assert n_packed == 5  # q, k, v, o, lm_head
    k, v = step.empty_cache()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        ref = step(ids, torch.tensor([0]), k, v)[0]
        nb = to_nbits_experts(step, accuracy_level=0)
        assert not any(isinstance(m, PackedLinear) for m in nb.modules())
        n_expert_proj = 2 * model.config.num_local_experts  # fused gate_up + down per expert
        assert sum(isinstance(m, NBitsLinear) for m in nb.modules()) == n_expert_proj + n_packed
        out = nb(ids, torch.tensor([0]), k, v)[0]
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5  # the eager MatMulNBits form is exact
        xi, counts = to_xnnpack_int_experts(step)
        assert not any(isinstance(m, PackedLinear) for m in xi.modules())
        # 2/3-bit experts fit int4; asymmetric 4-bit attention and the 8-bit lm_head fall back to float linears
        assert counts == {"int4": 3 * model.config.num_local_experts, "float": n_packed}
        assert sqnr(ref, xi(ids, torch.tensor([0]), k, v)[0]) > 30  # int8 dynamic activations


def test_slices_have_the_real_layer_shapes():
    """mixtral-slice and qwen3-slice: the layer shapes the benchmark targets are stated for (configs only: the
    weights are GBs)."""
    from moe_export.bench.models import SLICES, describe_slice
    from moe_export.model_configs import tiny_config

    mix = tiny_config(SLICES["mixtral-slice"][0], **SLICES["mixtral-slice"][1])
    assert (mix.hidden_size, mix.intermediate_size, mix.num_local_experts, mix.num_experts_per_tok,
            mix.num_hidden_layers, mix.vocab_size) == (1024, 2816, 8, 2, 4, 8192)
    qw = tiny_config(SLICES["qwen3-slice"][0], **SLICES["qwen3-slice"][1])
    assert (qw.hidden_size, qw.moe_intermediate_size, qw.num_experts, qw.num_experts_per_tok, qw.num_hidden_layers,
            qw.mlp_only_layers) == (2048, 768, 128, 8, 2, [])
    assert "128 experts top-8" in describe_slice("qwen3-slice")


def test_cycled_plan_gives_each_expert_its_width():
    from moe_export.bench.models import cycled_plan
    from moe_export.model_configs import tiny_random_model

    plan = cycled_plan(tiny_random_model("MixtralForCausalLM", num_layers=1), [3, 2], group_size=32)
    assert plan.layers[0].bits == [3, 2] * 4 and plan.levels == [3, 2] and plan.quantizer.symmetric
    assert plan.mean_bits() == 2.5


def test_bench_no_export_refuses_export_modes(tmp_path):
    from click.testing import CliRunner

    from moe_export.cli import main

    r = CliRunner().invoke(main, ["bench", "--no-export", "--pte-modes", "native", "-o", str(tmp_path / "b")])
    assert r.exit_code != 0 and "--no-export exports nothing" in r.output
    assert not (tmp_path / "b").exists()


def test_targets_compare_our_torch_decode_with_llama_cpp_q2_k_per_thread_count():
    from moe_export.bench.run import AOT, _targets

    rows = {"1": {"quantized compiled": {"decode_tok_s": 190.0}, AOT: {"decode_tok_s": 250.0},
                  "llama.cpp Q2_K (117.0 MB)": {"decode_tok_s": 236.0}},
            "2": {"quantized compiled": {"decode_tok_s": 300.0}, "llama.cpp Q2_K (117.0 MB)": {"decode_tok_s": 470.0}}}
    res = {"latency": {"decode": {}}, "plan": {"mean_bits": 2.5}, "model": {}, "sizes": [],
           "throughput": {"threads": rows}}
    got = {t["target"]: t for t in _targets(res) if "llama.cpp" in t["target"]}
    assert got["1 thread(s): quantized compiled decode >= llama.cpp Q2_K (64 steps)"]["met"] is False
    assert got["1 thread(s): quantized AOTInductor decode >= llama.cpp Q2_K (64 steps)"]["met"] is True
    assert got["2 thread(s): quantized compiled decode >= llama.cpp Q2_K (64 steps)"]["value"].startswith("0.64x")
    assert len(got) == 3  # no row for a variant the run did not measure


def test_native_pte_rows_and_targets_on_every_bench_model():
    """Every bench model's default run exports the native .pte (tiny and small-mixtral, quick or not; both slices),
    and its targets are the issue's: decode >= 1.0x quantized compiled and >= 2x the float .pte, prefill >= the float
    .pte, size <= 1.05x the checkpoint (the native .onnx: 1.10x)."""
    from moe_export.bench.run import _default_modes, _targets

    for model in ("tiny", "small-mixtral", "mixtral-slice", "qwen3-slice"):
        for quick in (True, False):
            assert "native" in _default_modes(model, quick)["pte"], (model, quick)
    res = {"plan": {"mean_bits": 2.5}, "model": {}, "latency": {
        "decode": {"quantized compiled": {"ms": 4.0}, "pte quantized (native)": {"ms": 3.9},
                   "pte float (xnnpack)": {"ms": 7.7}},
        "prefill": {"pte quantized (native)": {"ms": 50.0}, "pte float (xnnpack)": {"ms": 60.0}}},
        "sizes": [{"artifact": "quantized checkpoint", "bytes": 1000},
                  {"artifact": "pte quantized (native)", "bytes": 1070},
                  {"artifact": "onnx quantized (native)", "bytes": 1070}]}
    met = {t["target"]: t["met"] for t in _targets(res)}
    assert met["pte quantized (native) decode >= 1.0x quantized compiled"]
    assert not met["pte quantized (native) decode >= 2x pte float (xnnpack)"]  # 1.97x
    assert met["pte quantized (native) prefill >= pte float (xnnpack)"]
    assert not met["pte quantized (native) <= 1.05x the quantized checkpoint's bytes"]  # 1.07x
    assert met["onnx quantized (native) <= 1.10x the quantized checkpoint's bytes"]
