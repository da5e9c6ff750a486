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


def test_run_bench_eager_only_writes_json_and_markdown(tmp_path):
    """Default-suite version: eager runtimes, no export/compile/subprocesses (those are in the slow test)."""
    from moe_export.bench.run import run_bench
    from moe_export.model_configs import tiny_random_model

    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    res = run_bench(model, tmp_path, quick=True, reps=3, targets=(), compile=False, peers=False, offline=False, rss=False,
                    progress=False, echo=lambda *_: None)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["settings"]["baseline"] == "float eager"
    dec = data["latency"]["decode"]
    assert set(dec) == {"float eager", "quantized eager"}
    assert all(dec[n]["ms"] > 0 and dec[n]["n"] == 3 for n in dec)
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


@pytest.mark.slow
def test_run_bench_writes_json_and_markdown(tmp_path):
    from moe_export.bench.run import run_bench
    from moe_export.model_configs import tiny_random_model

    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    docs = tmp_path / "benchmarks.md"
    res = run_bench(model, tmp_path / "out", quick=True, reps=2, offline=True, rss=True, docs=docs, progress=False,
                    echo=lambda *_: None)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["plan"]["mean_bits"] <= 3
    dec = data["latency"]["decode"]
    for name in ("float eager", "float compiled", "quantized eager", "quantized compiled", "pte quantized (packed)",
                 "pte float (xnnpack)", "onnx quantized", "onnx float", "torchao intx-wo int4 g32 eager"):
        assert dec[name]["ms"] > 0, (name, dec[name])
        assert data["latency"]["prefill"][name]["ms"] > 0, name
    assert dec["float compiled"]["speedup_vs_baseline"] == pytest.approx(1.0)
    assert data["block"]["decode"]["quantized compiled"]["ms"] > 0
    assert 0 < dec["quantized compiled"]["pct_of_roofline"]
    sizes = {r["artifact"]: r for r in data["sizes"]}
    assert sizes["pte quantized (packed)"]["bytes"] < sizes["pte float (xnnpack)"]["bytes"]
    assert sizes["pte quantized (packed)"]["rss"]["peak_MB"] > 0
    assert {r["quantizer"] for r in data["offline"]["quantize"] if r.get("weights_per_s", 0) > 0} == {"rtn", "hqq", "gptq"}
    md = docs.read_text()
    assert md == (tmp_path / "out" / "results.md").read_text()
    for heading in ("## Whole model", "## One MoE block", "## Roofline", "## Size and peak memory", "## Offline costs",
                    "## Targets"):
        assert heading in md
    assert res["targets"]
