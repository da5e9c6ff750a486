"""``moe-export bench``: every runtime of one model, side by side in one run.

    from moe_export.bench.run import run_bench
    results = run_bench("tiny", "runs/bench-tiny", quick=True)   # writes results.json + results.md

Steps: model -> mixed 3/2-bit plan (MaxVar, data-free) -> RTN quantize -> export (.pte, .onnx, float twins)
-> peers (torchao uniform int4, onnxruntime MatMulNBits 4-bit) -> interleaved latency (decode = 1 token with
a static KV cache of 128, prefill = 128 tokens; whole model and MoE block 0) -> bandwidth roofline ->
sizes and peak RSS (one subprocess per artifact) -> offline costs. Ratios are against float compiled.
"""

from __future__ import annotations

import copy
import platform
import time
from pathlib import Path

import torch

from moe_export.io import atomic_write_json, atomic_write_text

MAX_SEQ = 128  # static KV cache of every runtime; prefill fills it, decode writes position DECODE_POS
DECODE_POS = 64
BASELINE = "float compiled"  # "float eager" when compile=False


def _group_size(model) -> int | None:
    cfg = model.config
    for g in (128, 64, 32):
        if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0:
            return g
    return None


def _runner_fn(runner, tokens):
    k, v = torch.zeros(runner.cache_shape), torch.zeros(runner.cache_shape)
    pos = torch.tensor([0 if tokens.shape[1] > 1 else DECODE_POS], dtype=torch.long)
    return lambda: runner._run(tokens, pos, k, v)


def _step_fn(step, tokens):
    k, v = step.empty_cache()
    pos = torch.tensor([0 if tokens.shape[1] > 1 else DECODE_POS], dtype=torch.long)
    return lambda: step(tokens, pos, k, v)


def _compiled(module):
    return torch.compile(module, fullgraph=True, dynamic=False)


def run_bench(model="tiny", out_dir: str | Path | None = None, quick: bool = True, reps: int | None = None,
              avg_bits: float = 2.5, levels=(3, 2), targets=("pte", "onnx"), compile: bool = True, peers: bool = True,
              offline: bool = True, rss: bool = True,
              docs: str | Path | None = None, progress: bool = True, echo=print) -> dict:
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.bench import latency as lat
    from moe_export.bench import roofline, sizes
    from moe_export.bench.models import count_params, load_bench_model
    from moe_export.bench.report import format_markdown
    from moe_export.checkpoint import save_quantized
    from moe_export.export.pipeline import export_artifacts
    from moe_export.export.runners import open_runner
    from moe_export.export.wrapper import DecoderStep
    from moe_export.plan.methods import PlanConfig, make_plan

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    reps = reps or (10 if quick else 30)
    baseline = BASELINE if compile else "float eager"
    out = Path(out_dir or Path("runs") / f"bench-{Path(model).name if isinstance(model, str) else 'model'}")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"settings": {"quick": quick, "reps": reps, "threads": torch.get_num_threads(), "max_seq_len": MAX_SEQ,
                              "decode_position": DECODE_POS, "prefill_tokens": MAX_SEQ, "baseline": baseline,
                              "torch": torch.__version__, "machine": platform.machine(), "cpu": platform.processor()}}

    echo("[1/7] model and plan")
    fmodel, info = load_bench_model(model)
    info["parameters"] = count_params(fmodel)
    res["model"] = info
    gs = _group_size(fmodel)
    plan = make_plan(fmodel, PlanConfig(avg_bits=avg_bits, levels=list(levels), method="maxvar", group_size=gs), progress=False)
    res["plan"] = {"method": "maxvar", "mean_bits": plan.mean_bits(), "levels": list(plan.levels), "group_size": gs,
                   "quantizer": "rtn"}
    qmodel = quantize_(copy.deepcopy(fmodel), MoEQuantConfig(plan, quantizer="rtn"), progress=False)
    fdir, qdir = out / "float", out / "quantized"
    fmodel.save_pretrained(fdir)
    save_quantized(qmodel, qdir, plan=plan)

    echo(f"[2/7] export {', '.join(targets) or 'nothing'} (quantized and float)")
    modes = ("packed",) if quick else ("packed", "xnnpack")
    t0 = time.perf_counter()
    if targets:
        report = export_artifacts(qmodel, out / "export", targets=tuple(targets), pte_modes=modes, float_model=fmodel,
                                  max_seq_len=MAX_SEQ, check=not quick, latency=False, progress=progress)
    else:
        from moe_export.export.prepare import prepare_for_export, theoretical_size

        report = {"theoretical": theoretical_size(prepare_for_export(qmodel)), "artifacts": []}
    res["export"] = {"s": time.perf_counter() - t0, "theoretical": report["theoretical"], "artifacts": report["artifacts"]}

    peer_models = {}
    if peers:
        echo("[3/7] peers: torchao uniform int4 on per-expert nn.Linear, onnxruntime MatMulNBits 4-bit")
        from moe_export.bench.peers import expert_bytes_of, matmulnbits_onnx, torchao_peer

        res["peers"] = {}
        for cfg in (("intx-wo",) if quick else ("intx-wo", "int8da-intx")):
            try:
                pm = torchao_peer(fmodel, cfg, bits=4, group_size=32)
                peer_models[f"torchao {cfg} int4 g32"] = pm
                res["peers"][f"torchao {cfg} int4 g32"] = {"expert_bytes": expert_bytes_of(pm)}
            except Exception as err:
                res["peers"][f"torchao {cfg} int4 g32"] = {"error": f"{type(err).__name__}: {err}"[:200]}
        fonnx = [a["path"] for a in report["artifacts"] if a["target"] == "onnx-float"]
        try:
            if fonnx:
                res["peers"]["ort MatMulNBits int4 g32"] = matmulnbits_onnx(fonnx[0], out / "export" / "float-matmulnbits4.onnx")
        except Exception as err:
            res["peers"]["ort MatMulNBits int4 g32"] = {"error": f"{type(err).__name__}: {err}"[:200]}

    echo("[4/7] latency (interleaved, median)")
    gen = torch.Generator().manual_seed(0)
    vocab = fmodel.config.vocab_size
    dec_ids = torch.randint(0, vocab, (1, 1), generator=gen)
    pre_ids = torch.randint(0, vocab, (1, MAX_SEQ), generator=gen)
    variants_model: dict[str, object] = {}  # name -> step module or runner
    torch_models = {"float": fmodel, "quantized": qmodel, **peer_models}
    for name, m in torch_models.items():
        step = DecoderStep(m, MAX_SEQ)
        variants_model[f"{name} eager"] = ("step", step)
        if compile:
            variants_model[f"{name} compiled"] = ("step", _compiled(step))
    art_names = {}
    for a in report["artifacts"]:
        kind = "pte" if a["path"].endswith(".pte") else "onnx"
        label = f"{kind} {'float' if a['target'].endswith('-float') else 'quantized'}" + (f" ({a['mode']})" if a["mode"] else "")
        art_names[label] = a["path"]
    p = (res.get("peers") or {}).get("ort MatMulNBits int4 g32", {})
    if "path" in p:
        art_names["onnx ort MatMulNBits int4 g32"] = p["path"]
    for label, path in art_names.items():
        try:
            variants_model[label] = ("runner", open_runner(path))
        except Exception as err:
            res.setdefault("errors", {})[label] = f"{type(err).__name__}: {err}"[:200]
    res["latency"] = {}
    for phase, ids in (("decode", dec_ids), ("prefill", pre_ids)):
        fns = {n: (_step_fn(o, ids) if k == "step" else _runner_fn(o, ids)) for n, (k, o) in variants_model.items()}
        res["latency"][phase] = lat.with_ratios(lat.interleaved(fns, reps=reps, progress=progress, desc=f"model {phase}"),
                                                baseline)
    blocks = {n: m.model.layers[0].mlp for n, m in torch_models.items()}  # peers' experts are LinearExperts
    res["block"] = {}
    H = fmodel.config.hidden_size
    for phase, t in (("decode", 1), ("prefill", MAX_SEQ)):
        x = torch.randn(1, t, H, generator=gen)
        fns = {}
        for n, b in blocks.items():
            fns[f"{n} eager"] = (lambda b=b, x=x: b(x))
            if compile:
                cb = _compiled(b)
                fns[f"{n} compiled"] = (lambda cb=cb, x=x: cb(x))
        res["block"][phase] = lat.with_ratios(lat.interleaved(fns, reps=reps, progress=progress, desc=f"block {phase}"),
                                              baseline)

    atomic_write_json(out / "results.json", res)  # partial: the latency is the costly part

    echo("[5/7] memory bandwidth roofline")
    bw = roofline.measure_bandwidth(128 if quick else 512)
    bytes_f = roofline.bytes_per_decoded_token(fmodel)
    bytes_q = roofline.bytes_per_decoded_token(fmodel, plan)
    res["roofline"] = {"bandwidth": bw, "bytes_float": bytes_f, "bytes_quantized": bytes_q,
                       "limit_ms_float": roofline.limit_ms(bytes_f["weights"], bw["GBps"]),
                       "limit_ms_quantized": roofline.limit_ms(bytes_q["weights"], bw["GBps"])}
    for name, r in res["latency"]["decode"].items():
        if "ms" in r:
            lim = res["roofline"]["limit_ms_quantized" if _is_ours(name) else "limit_ms_float"]
            if not name.startswith(("float", "pte float", "onnx float")) and not _is_ours(name):
                lim = None  # peers: their own bytes differ; see the peers rows
            if lim:
                r["limit_ms"] = lim
                r["pct_of_roofline"] = 100 * lim / r["ms"]

    echo("[6/7] sizes and peak RSS")
    theory = report["theoretical"]["total"]
    rows = [{"artifact": "float HF checkpoint", "path": str(fdir), "bytes": sizes.disk_bytes(fdir), "kind": "hf"},
            {"artifact": "quantized checkpoint", "path": str(qdir), "bytes": sizes.disk_bytes(qdir), "kind": "quantized",
             "theoretical_bytes": theory}]
    for label, path in art_names.items():
        row = {"artifact": label, "path": path, "bytes": sizes.disk_bytes(path), "kind": Path(path).suffix[1:]}
        if label.startswith(("pte quantized", "onnx quantized")):
            row["theoretical_bytes"] = theory
        rows.append(row)
    for row in rows:
        if "theoretical_bytes" in row:
            row["vs_theoretical"] = row["bytes"] / row["theoretical_bytes"]
        if rss:
            row["rss"] = sizes.peak_rss(row["kind"], row["path"])
    for name, p in (res.get("peers") or {}).items():
        if "expert_bytes" in p:
            rows.append({"artifact": f"{name} (in memory, experts only)", "bytes": p["expert_bytes"], "kind": "memory"})
    res["sizes"] = rows

    if offline:
        echo("[7/7] offline costs (plan per method, quantizer throughput)")
        from moe_export.bench.offline import CALIBRATED, DATA_FREE, plan_times, quantize_throughput

        batches = torch.randint(0, vocab, (4, 32) if quick else (8, 64), generator=gen)
        try:
            res["offline"] = {
                "plan": plan_times(fmodel, avg_bits, list(levels), gs, batches,
                                   methods=("maxvar", "frequency") if quick else DATA_FREE + CALIBRATED, progress=progress),
                "quantize": quantize_throughput(fmodel, plan, batches, progress=progress),
            }
        except Exception as err:  # keep the rest of the table
            res.setdefault("errors", {})["offline"] = f"{type(err).__name__}: {err}"[:300]
    res["targets"] = _targets(res)
    res["wall_s"] = time.perf_counter() - t_start
    atomic_write_json(out / "results.json", res)
    md = format_markdown(res)
    atomic_write_text(out / "results.md", md)
    if docs:
        atomic_write_text(docs, md)
    echo(md)
    return res


def _is_ours(name: str) -> bool:
    return name.startswith(("quantized", "pte quantized", "onnx quantized"))


def _targets(res: dict) -> list[dict]:
    dec = res["latency"]["decode"]
    out = []

    def ms(n):
        return dec.get(n, {}).get("ms")

    if ms("quantized compiled") and ms(BASELINE):
        sp = ms(BASELINE) / ms("quantized compiled")
        out.append({"target": "quantized compiled decode >= 2x float compiled (<= 3 avg bits)", "value": f"{sp:.2f}x",
                    "met": sp >= 2 and res["plan"]["mean_bits"] <= 3})
    pct = dec.get("quantized compiled", {}).get("pct_of_roofline")
    if pct is not None:
        out.append({"target": "quantized compiled decode >= 50% of the bandwidth limit", "value": f"{pct:.1f}%", "met": pct >= 50})
    for kind in ("pte", "onnx"):
        fl = [n for n in dec if n.startswith(f"{kind} float") and "ms" in dec[n]]
        qs = [n for n in dec if n.startswith(f"{kind} quantized") and "ms" in dec[n]]
        for q in qs:
            if fl:
                r = dec[fl[0]]["ms"] / dec[q]["ms"]
                out.append({"target": f"{q} decode no slower than {fl[0]}", "value": f"{r:.2f}x", "met": r >= 1})
    for row in res["sizes"]:
        if "vs_theoretical" in row:
            v = row["vs_theoretical"]
            out.append({"target": f"{row['artifact']} within 5% of theoretical size", "value": f"{v:.3f}",
                        "met": abs(v - 1) <= 0.05})
    return out
