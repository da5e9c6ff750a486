"""``moe-export bench``: every runtime of one model, side by side in one run.

    from moe_export.bench.run import run_bench
    results = run_bench("tiny", "runs/bench-tiny", quick=True)   # writes results.json + results.md

Steps: model -> mixed 3/2-bit expert plan (MaxVar, data-free) with the stated non-expert widths -> RTN quantize
-> export (.pte and .onnx: packed and speed modes, float twins) -> peers (torchao uniform int4, onnxruntime
MatMulNBits 4-bit) -> interleaved latency (decode = 1 token with a static KV cache of 128, prefill = 128
tokens; whole model and MoE block 0) -> throughput at 1 and 2 threads (llama-bench's protocol: 64 greedy decode
steps from an empty cache, tok/s; prefill 128 tokens, tok/s) -> where a compiled decode step spends its time ->
bandwidth roofline (DRAM and cached, the last-level cache size, at each thread count) -> sizes and peak RSS (one
subprocess per artifact) -> offline costs. Ratios are against float compiled.

``model="mixtral-slice"`` / ``"qwen3-slice"`` (``bench.models.SLICES``): real layer shapes with random weights,
whose weights do not fit the caches. Their defaults leave out what would not fit the machine or the time:
modes that materialise dequantized experts (packed .pte/.onnx), the .pte speed modes, peers (dense experts),
offline costs, and float twins whose single-file .onnx would pass protobuf's 2 GB (``--quick``: every float twin;
a 1.2 GB float .onnx takes minutes to export).
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import threading
import time
import types
from pathlib import Path

import torch

from moe_export.io import atomic_write_json, atomic_write_text

MAX_SEQ = 128  # static KV cache of every runtime; prefill fills it, decode writes position DECODE_POS
DECODE_POS = 64
BASELINE = "float compiled"  # "float eager" when compile=False
BANDWIDTH_TURN = "DRAM bandwidth: "  # the limit's own turns in the throughput rounds (not rows of the table)
AOT = "quantized AOTInductor"  # the quantized step compiled ahead of time (export.aot.AotStep)
BURST = 3  # timed calls per variant per round, after one untimed call (see latency.interleaved)
# Non-expert widths of the bench plan: attention at 4 bits in the experts' group size (the paper's setting),
# lm_head at 8 bits per row; router, norms and the embedding table stay float (the table is read one row a
# token). "float" keeps every non-expert weight float.
DEFAULT_NON_EXPERT = "attention=4,lm_head=8:row:sym"
# xnnpack-int lowers one XNNPACK delegate per expert: minutes of ExecuTorch passes (tiny: 2 min, small-mixtral:
# 6 min on a busy 2-core machine), so --quick leaves it to the full run (or --pte-modes).
QUICK_MODES = {"pte": ("native",), "onnx": ("packed", "fast", "native")}
FULL_MODES = {"pte": ("native", "packed", "xnnpack", "xnnpack-int"), "onnx": ("packed", "fast", "native")}
# slices: the packed modes gather whole dequantized experts per token (2.95 GB at the mixtral slice's prefill)
SLICE_MODES = {"pte": ("native",), "onnx": ("fast", "native")}
THREADS = (1, 2)  # thread counts of the throughput phase
DECODE_STEPS = 64  # llama-bench -p 0 -n 64
LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q4_K_M")  # llama.cpp k-quants about the size of 2.5- to 4-bit plans
FLOAT_TWIN_MAX_BYTES = 1.5e9  # a float .onnx is one protobuf (2 GB limit, weights inside)
# a native artifact's bytes over the quantized checkpoint's: the .pte stores every code at its width (1.05x); the
# .onnx widens 1/3/5-7-bit codes to onnxruntime's 2/4/8-bit containers (1.10x)
NATIVE_SIZE_LIMIT = {"pte": 1.05, "onnx": 1.10}


def _group_size(model) -> int | None:
    cfg = model.config
    for g in (128, 64, 32):
        if cfg.hidden_size % g == 0 and cfg.intermediate_size % g == 0:
            return g
    return None


def _own_code(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with a forward of its own code object. torch.compile keeps one cache per code object, so
    variants of one class compiled in one process would check each other's guards on every call (a cost
    that lands on whichever variant was compiled first)."""
    cls = type(module)
    fwd = cls.forward
    code = fwd.__code__.replace(co_name=f"{fwd.__code__.co_name}_{id(module):x}")
    fn = types.FunctionType(code, fwd.__globals__, code.co_name, fwd.__defaults__, fwd.__closure__)
    module.__class__ = type(cls.__name__, (cls,), {"forward": fn, "__module__": cls.__module__})
    return module


def _runner_fn(runner, tokens):
    k, v = torch.zeros(runner.cache_shape), torch.zeros(runner.cache_shape)
    pos = torch.tensor([0 if tokens.shape[1] > 1 else DECODE_POS], dtype=torch.long)
    return lambda: runner.run(tokens, pos, k, v)


def _load_avg() -> float | None:
    """1-minute load average: other jobs on a small machine inflate every absolute time of the run."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cpu_model() -> str | None:
    """The CPU's model name (``/proc/cpuinfo``); ``platform.processor()`` is empty on most Linux machines."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _step_fn(step, tokens):
    k, v = step.empty_cache()
    pos = torch.tensor([0 if tokens.shape[1] > 1 else DECODE_POS], dtype=torch.long)
    return lambda: step(tokens, pos, k, v)


def _compiled(module):
    """A decoder step as a decode loop compiles it (``CompiledStep``), a MoE block as the model's forward does."""
    from moe_export.export.wrapper import CompiledStep, DecoderStep

    if isinstance(module, DecoderStep):
        return CompiledStep(_own_code(module))
    return torch.compile(_own_code(module), fullgraph=True, dynamic=False)


def _plan_summary(plan, fmodel, theory: dict) -> dict:
    from moe_export.size import theoretical_expert_bytes
    from moe_export.bench.models import count_params
    from moe_export.models import find_moe_layers

    n_expert = sum(layer.expert_weight(p, e).numel() for layer in find_moe_layers(fmodel)
                   for p in layer.projections for e in range(layer.num_experts))
    n_all = count_params(fmodel)
    return {
        "method": plan.provenance.get("method", "maxvar"), "mean_bits": plan.mean_bits(), "levels": list(plan.levels),
        "group_size": plan.quantizer.group_size, "symmetric": plan.quantizer.symmetric, "quantizer": "rtn",
        "non_expert": {r: q.to_dict() for r, q in plan.non_expert_policy().quantized().items()},
        "expert_bits_per_weight": 8 * theoretical_expert_bytes(fmodel, plan) / n_expert,  # codes + scales/zeros
        "model_bits_per_weight": 8 * theory["total"] / n_all,
        "expert_params": n_expert, "params": n_all,
    }


def _default_modes(model, quick: bool) -> dict:
    from moe_export.bench.models import SLICES

    if isinstance(model, str) and model in SLICES:
        return SLICE_MODES
    return QUICK_MODES if quick else FULL_MODES


def _command_line(model_name: str, quick: bool, pte_modes, onnx_modes, export: bool = True) -> str:
    """The ``moe-export bench`` command that reproduces a run (modes spelled out only where not the default)."""
    cmd = f"moe-export bench{' --quick' if quick else ''} --model {model_name}"
    if not export:
        return cmd + " --no-export"
    defaults = _default_modes(model_name, quick)
    for kind, given in (("pte", pte_modes), ("onnx", onnx_modes)):
        if tuple(given) != tuple(defaults[kind]):
            cmd += f" --{kind}-modes {','.join(given)}"
    return cmd


def run_bench(model="tiny", out_dir: str | Path | None = None, quick: bool = True, reps: int | None = None,
              avg_bits: float = 2.5, levels=(3, 2), non_expert: str | None = DEFAULT_NON_EXPERT,
              targets=("pte", "onnx"), pte_modes=None, onnx_modes=None, compile: bool = True, peers: bool | None = None,
              offline: bool | None = None, rss: bool = True, docs: str | Path | None = None, progress: bool = True,
              threads=THREADS, llama_cpp: str | Path | None = None, llama_types=LLAMA_TYPES, echo=print) -> dict:
    """Runs the benchmark and returns (and writes) its results. ``peers`` / ``offline`` None: on, except for the
    slices (``bench.models.SLICES``). ``threads``: thread counts of the throughput phase (empty: skip it).
    ``llama_cpp``: a llama.cpp build folder (or ``$MOE_EXPORT_LLAMA_CPP``): the float model converted to GGUF and
    quantized to ``llama_types`` joins the throughput phase as a peer."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.bench import latency as lat
    from moe_export.bench import roofline, sizes
    from moe_export.bench.llama_cpp import LlamaCpp
    from moe_export.bench.models import SLICES, count_params, load_bench_model
    from moe_export.bench.report import format_markdown
    from moe_export.checkpoint import save_quantized
    from moe_export.export.aot import AotStep
    from moe_export.export.pipeline import export_artifacts
    from moe_export.export.runners import open_runner
    from moe_export.export.wrapper import DecoderStep
    from moe_export.kernels import cpu_ops
    from moe_export.plan.bitplan import NonExpertPolicy
    from moe_export.plan.methods import PlanConfig, make_plan
    from moe_export.size import disk_bytes

    torch.set_num_threads(1)
    is_slice = isinstance(model, str) and model in SLICES
    peers = (not is_slice) if peers is None else peers
    offline = (not is_slice) if offline is None else offline
    t_start = time.perf_counter()
    phases: dict[str, float] = {}
    say = echo

    def echo(msg):  # every "[i/9] ..." line starts a phase; its wall time goes into results.json (phase_s)
        now = time.perf_counter() - t_start
        if phases:
            last = next(reversed(phases))
            phases[last] = round(now - phases[last], 1)
        phases[msg.split(":")[0].split("(")[0].strip()[:40]] = now
        say(msg)

    # the C++ kernels build (first run: tens of seconds) while the model is planned, quantized and exported
    builder = threading.Thread(target=cpu_ops.kernel, daemon=True)
    builder.start()
    reps = reps or (10 if quick else 30)
    baseline = BASELINE if compile else "float eager"
    modes = _default_modes(model, quick)
    pte_modes = tuple(pte_modes or modes["pte"])
    onnx_modes = tuple(onnx_modes or modes["onnx"])
    # a target with no quantized mode gets no float twin either (the slices: .onnx only)
    targets = tuple(t for t in targets if (pte_modes if t == "pte" else onnx_modes))
    out = Path(out_dir or Path("runs") / f"bench-{Path(model).name if isinstance(model, str) else 'model'}")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"settings": {"quick": quick, "reps": reps, "threads": torch.get_num_threads(), "max_seq_len": MAX_SEQ,
                              "decode_position": DECODE_POS, "prefill_tokens": MAX_SEQ, "baseline": baseline,
                              "burst": BURST, "torch": torch.__version__, "machine": platform.machine(), "cpu": platform.processor(),
                              "pte_modes": list(pte_modes), "onnx_modes": list(onnx_modes),
                              "cpus": os.cpu_count(), "cpu_model": _cpu_model(), "load_avg_start": _load_avg()}}

    echo("[1/9] model and plan")
    fmodel, info = load_bench_model(model)
    res["settings"]["command"] = _command_line(info["model"], quick, pte_modes, onnx_modes, bool(targets))
    info["parameters"] = count_params(fmodel)
    info["experts_implementation"] = getattr(fmodel.config, "_experts_implementation", None)
    res["model"] = info
    gs = _group_size(fmodel)
    cfg = PlanConfig(avg_bits=avg_bits, levels=list(levels), method="maxvar", group_size=gs)
    cfg.non_expert = NonExpertPolicy.parse(non_expert, gs)
    plan = make_plan(fmodel, cfg, progress=False)
    llama = None
    if threads and (peer := LlamaCpp.find(llama_cpp)) is not None:
        echo(f"[1/9] llama.cpp peer: the float model as GGUF, quantized to {', '.join(llama_types)}")
        llama = (peer, _llama_cpp_models(peer, fmodel, out / "llama-cpp", llama_types))
    if is_slice:
        # GBs of float weights: quantize this build in place and build the float model again from the same seed
        # (one float copy in memory, never two)
        qmodel = quantize_(fmodel, MoEQuantConfig(plan, quantizer="rtn"), progress=False)
        fmodel, _ = load_bench_model(model)
    else:
        qmodel = quantize_(copy.deepcopy(fmodel), MoEQuantConfig(plan, quantizer="rtn"), progress=False)
    fdir, qdir = out / "float", out / "quantized"
    fmodel.save_pretrained(fdir)
    save_quantized(qmodel, qdir, plan=plan)

    what = "; ".join(f"{t} {', '.join(pte_modes if t == 'pte' else onnx_modes)}" for t in targets)
    echo(f"[2/9] export {what or 'nothing'}; float twins")
    t0 = time.perf_counter()
    if targets:
        float_bytes = sum(p.numel() * p.element_size() for p in fmodel.parameters())
        report = export_artifacts(qmodel, out / "export", targets=tuple(targets), pte_modes=pte_modes,
                                  onnx_modes=onnx_modes, float_model=fmodel, max_seq_len=MAX_SEQ, check=False,
                                  latency=False, progress=progress,
                                  float_baseline=float_bytes <= FLOAT_TWIN_MAX_BYTES and not (is_slice and quick))
    else:
        from moe_export.export.prepare import prepare_for_export, theoretical_size

        report = {"theoretical": theoretical_size(prepare_for_export(qmodel)), "artifacts": []}
    res["export"] = {"s": time.perf_counter() - t0, "theoretical": report["theoretical"], "artifacts": report["artifacts"]}
    res["plan"] = _plan_summary(plan, fmodel, report["theoretical"])

    peer_models = {}
    if peers:
        echo("[3/9] peers: torchao uniform int4 on per-expert nn.Linear, onnxruntime MatMulNBits 4-bit")
        from moe_export.bench.peers import expert_bytes_of, matmulnbits_onnx, torchao_peer

        res["peers"] = {}
        for pcfg in (("intx-wo",) if quick else ("intx-wo", "int8da-intx")):
            try:
                pm = torchao_peer(fmodel, pcfg, bits=4, group_size=32)
                peer_models[f"torchao {pcfg} int4 g32"] = pm
                res["peers"][f"torchao {pcfg} int4 g32"] = {"expert_bytes": expert_bytes_of(pm)}
            except Exception as err:
                res["peers"][f"torchao {pcfg} int4 g32"] = {"error": f"{type(err).__name__}: {err}"[:200]}
        fonnx = [a["path"] for a in report["artifacts"] if a["target"] == "onnx-float"]
        try:
            if fonnx:
                res["peers"]["ort MatMulNBits int4 g32"] = matmulnbits_onnx(fonnx[0], out / "export" / "float-matmulnbits4.onnx")
        except Exception as err:
            res["peers"]["ort MatMulNBits int4 g32"] = {"error": f"{type(err).__name__}: {err}"[:200]}

    builder.join()
    res["settings"]["kernel_path"] = cpu_ops.kernel_path()  # which vector path the C++ kernels run
    res["settings"]["accuracy"] = cpu_ops.accuracy()  # their arithmetic: exact fp32 or int8 activations
    echo("[4/9] latency (interleaved, median)")
    gen = torch.Generator().manual_seed(0)
    vocab = fmodel.config.vocab_size
    dec_ids = torch.randint(0, vocab, (1, 1), generator=gen)
    pre_ids = torch.randint(0, vocab, (1, MAX_SEQ), generator=gen)
    torch_models = {"float": fmodel, "quantized": qmodel, **peer_models}
    if compile and info["experts_implementation"] != "batched_mm" and not is_slice:
        # the model's own experts implementation is the baseline; batched_mm is the fastest float one at decode.
        # Not on the slices: its prefill gathers one [2I, H] weight per routed token (5.9 GB on the mixtral slice)
        # a copy of the module tree sharing the weights (a slice's float weights are GBs), with its own config
        fbmm = copy.deepcopy(fmodel, memo={id(p): p for p in fmodel.parameters()})
        fbmm.set_experts_implementation("batched_mm")
        torch_models["float (batched_mm)"] = fbmm
    variants_model: dict[str, tuple] = {}  # name -> ("step" | "runner", object)
    for name, m in torch_models.items():
        step = DecoderStep(m, MAX_SEQ)
        if name != "float (batched_mm)":
            variants_model[f"{name} eager"] = ("step", step)
        if compile and not (quick and name.startswith("torchao")):  # torchao's compile takes minutes
            label = f"{name} compiled" if "(" not in name else name.replace(" (", " compiled (")
            variants_model[label] = ("step", _compiled(DecoderStep(m, MAX_SEQ)))
        if compile and name == "quantized":  # the same graph without Python between the kernels (export.aot)
            variants_model[AOT] = ("step", AotStep(DecoderStep(m, MAX_SEQ)))
    art_names: dict[str, str] = {}
    art_rows: dict[str, dict] = {}
    for a in report["artifacts"]:
        kind = "pte" if a["path"].endswith(".pte") else "onnx"
        label = f"{kind} {'float' if a['target'].endswith('-float') else 'quantized'}" + (f" ({a['mode']})" if a["mode"] else "")
        art_names[label] = a["path"]
        art_rows[label] = a
    p = (res.get("peers") or {}).get("ort MatMulNBits int4 g32", {})
    if "path" in p:
        art_names["onnx ort MatMulNBits int4 g32"] = p["path"]
    runners = {}
    for label, path in art_names.items():
        try:
            # one thread, as every other variant of the latency phase (the ExecuTorch pool defaults to all cores)
            runners[label] = open_runner(path, threads=1)
            variants_model[label] = ("runner", runners[label])
        except Exception as err:
            res.setdefault("errors", {})[label] = f"{type(err).__name__}: {err}"[:200]
    res["latency"] = {}
    # a variant whose calls take long (portable-kernel prefill: seconds a call) gets fewer timed runs, or the
    # full run's 30 rounds x 4 calls of it alone would take half an hour
    budget = 6.0 if quick else 30.0
    for phase, ids in (("decode", dec_ids), ("prefill", pre_ids)):
        fns = {n: (_step_fn(o, ids) if k == "step" else _runner_fn(o, ids)) for n, (k, o) in variants_model.items()}
        res["latency"][phase] = lat.with_ratios(
            lat.interleaved(fns, reps=reps, progress=progress, desc=f"model {phase}", budget_s=budget, burst=BURST),
            baseline)
    blocks = {n: m.model.layers[0].mlp for n, m in torch_models.items()}  # peers' experts are LinearExperts
    res["block"] = {}
    H = fmodel.config.hidden_size
    compiled_blocks = {}
    for phase, t in (("decode", 1), ("prefill", MAX_SEQ)):
        x = torch.randn(1, t, H, generator=gen)
        fns = {}
        for n, b in blocks.items():
            if n != "float (batched_mm)":
                fns[f"{n} eager"] = (lambda b=b, x=x: b(x))
            if compile and not (quick and n.startswith("torchao")):
                if n not in compiled_blocks:
                    compiled_blocks[n] = _compiled(copy.copy(b))
                cb = compiled_blocks[n]
                label = f"{n} compiled" if "(" not in n else n.replace(" (", " compiled (")
                fns[label] = (lambda cb=cb, x=x: cb(x))
        res["block"][phase] = lat.with_ratios(
            lat.interleaved(fns, reps=reps, progress=progress, desc=f"block {phase}", budget_s=budget, burst=BURST),
            baseline)

    atomic_write_json(out / "results.json", res)  # partial: the latency is the costly part

    if threads:
        echo(f"[5/9] throughput at {', '.join(map(str, threads))} threads ({DECODE_STEPS} greedy decode steps from an "
             f"empty cache; prefill {MAX_SEQ} tokens)")
        res["throughput"] = _throughput(variants_model, art_names, runners, pre_ids, threads, compile,
                                        reps=3 if quick else 10, progress=progress, budget_s=budget * 10, llama=llama)
        torch.set_num_threads(1)
        atomic_write_json(out / "results.json", res)

    echo("[6/9] parity of the exported artifacts vs eager quantized, and where a decode step spends its time")
    res["parity"] = _parity(runners, art_rows, qmodel, fmodel, vocab)
    if compile:
        from moe_export.bench.profile import step_breakdown

        prof = {}
        for name in ("float compiled", "quantized compiled"):
            kind, obj = variants_model.get(name, (None, None))
            if kind == "step":
                try:
                    prof[name] = step_breakdown(_step_fn(obj, dec_ids), steps=20 if quick else 50)
                except Exception as err:  # the profile is a diagnostic: keep the table
                    prof[name] = {"error": f"{type(err).__name__}: {err}"[:200]}
        res["step_profile"] = prof

    echo("[7/9] memory bandwidth roofline")
    bw = roofline.measure_bandwidth(512, reps=3 if quick else 5)  # larger than the last-level cache: DRAM
    bytes_f = roofline.bytes_per_decoded_token(fmodel)
    bytes_q = roofline.bytes_per_decoded_token(fmodel, plan)
    cache_f, cache_q = (roofline.cache_resident_GBps(b["weights"]) for b in (bytes_f, bytes_q))
    res["roofline"] = {"bandwidth": bw, "bytes_float": bytes_f, "bytes_quantized": bytes_q,
                       "limit_ms_float": roofline.limit_ms(bytes_f["weights"], bw["GBps"]),
                       "limit_ms_quantized": roofline.limit_ms(bytes_q["weights"], bw["GBps"]),
                       "cache_GBps_float": cache_f, "cache_GBps_quantized": cache_q,
                       "cache_limit_ms_float": roofline.limit_ms(bytes_f["weights"], cache_f),
                       "cache_limit_ms_quantized": roofline.limit_ms(bytes_q["weights"], cache_q),
                       "llc_bytes": roofline.last_level_cache_bytes(),
                       "model_bytes_quantized": report["theoretical"]["total"],
                       "model_bytes_float": float(sum(p.numel() * p.element_size() for p in fmodel.parameters()))}
    if "throughput" in res:
        _throughput_roofline(res, bw, bytes_f["weights"], bytes_q["weights"], reps=3 if quick else 5)
    for name, r in res["latency"]["decode"].items():
        if "ms" in r:
            lim = None
            if _is_ours(name) and not _is_speed_mode(name):
                lim = res["roofline"]["limit_ms_quantized"]
            elif name.startswith(("float", "pte float", "onnx float")):
                lim = res["roofline"]["limit_ms_float"]
            # peers and speed modes read other bytes (int8-stored int4, 4-bit containers, float fallbacks)
            if lim:
                r["limit_ms"] = lim
                r["pct_of_roofline"] = 100 * lim / r["ms"]
                clim = res["roofline"]["cache_limit_ms_quantized" if _is_ours(name) else "cache_limit_ms_float"]
                r["pct_of_cache_roofline"] = 100 * clim / r["ms"]
    for name, pr in (res.get("step_profile") or {}).items():
        lim = res["roofline"]["limit_ms_quantized" if name.startswith("quantized") else "limit_ms_float"]
        if pr.get("weight_kernels_ms"):
            pr["weight_kernels_pct_of_roofline"] = 100 * lim / pr["weight_kernels_ms"]

    echo("[8/9] sizes and peak RSS")
    theory = report["theoretical"]["total"]
    rows = [{"artifact": "float HF checkpoint", "path": str(fdir), "bytes": disk_bytes(fdir), "kind": "hf"},
            {"artifact": "quantized checkpoint", "path": str(qdir), "bytes": disk_bytes(qdir), "kind": "quantized",
             "theoretical_bytes": theory}]
    for label, path in art_names.items():
        row = {"artifact": label, "path": path, "bytes": disk_bytes(path), "kind": Path(path).suffix[1:]}
        if label.startswith(("pte quantized", "onnx quantized")):
            row["theoretical_bytes"] = theory
            if _is_speed_mode(label):
                row["speed_mode"] = True
        rows.append(row)
    for row in rows:
        if "theoretical_bytes" in row:
            row["vs_theoretical"] = row["bytes"] / row["theoretical_bytes"]
        # one fresh process each (~5-10 s of imports): --quick measures the two checkpoints and our artifacts
        if rss and (not quick or row["kind"] in ("hf", "quantized") or "theoretical_bytes" in row):
            row["rss"] = sizes.peak_rss(row["kind"], row["path"])
    for name, p in (res.get("peers") or {}).items():
        if "expert_bytes" in p:
            rows.append({"artifact": f"{name} (in memory, experts only)", "bytes": p["expert_bytes"], "kind": "memory"})
    res["sizes"] = rows

    if offline:
        echo("[9/9] offline costs (plan per method, quantizer throughput)")
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
    res["settings"]["load_avg_end"] = _load_avg()
    if phases:
        last = next(reversed(phases))
        phases[last] = round(res["wall_s"] - phases[last], 1)
    res["phase_s"] = phases
    atomic_write_json(out / "results.json", res)
    md = format_markdown(res)
    atomic_write_text(out / "results.md", md)
    if docs:
        atomic_write_text(docs, md)
    say(md)
    return res


def _throughput(variants: dict, art_names: dict, runners: dict, pre_ids, threads, compile: bool, reps: int,
                progress: bool, budget_s: float | None = None, llama=None) -> dict:
    """llama-bench's protocol per thread count: decode = ``DECODE_STEPS`` greedy steps from an empty cache (tok/s
    = steps / wall time of the run), prefill = one ``MAX_SEQ``-token step (tok/s = tokens / its time); the torch
    steps (compiled, or eager without compile), the .onnx and the .pte artifacts, interleaved. The .pte runners
    are loaded again for each thread count (the ExecuTorch pool is process-wide and a loaded program keeps the pool
    it was loaded with) and at one thread afterwards. ``budget_s``: timed seconds a variant may take per thread count (a run
    whose threads fight other jobs for the cores gets fewer runs; its ``decode_n`` says how many). ``llama``:
    ``(LlamaCpp, {type: gguf})``: one ``llama-bench -r 1`` run per turn in the same rounds; its row is the median of
    llama-bench's own tok/s (a run's wall time includes loading the file)."""
    from moe_export.bench import latency as lat
    from moe_export.bench import roofline
    from moe_export.export.runners import OnnxRunner

    kind = "compiled" if compile else "eager"
    torch_steps = {n: o for n, (k, o) in variants.items() if k == "step" and n in (f"float {kind}", f"quantized {kind}", AOT)}
    onnx_paths = {label: path for label, path in art_names.items() if label.startswith(("onnx quantized", "onnx float"))}
    out = {"decode_steps": DECODE_STEPS, "prefill_tokens": int(pre_ids.shape[1]), "reps": reps, "threads": {}}
    for t in threads:
        torch.set_num_threads(t)
        calls = {name: (step, step.cache_shape()) for name, step in torch_steps.items()}
        for label, path in onnx_paths.items():
            if label in runners:  # opened (a session's threads are fixed when it is built)
                r = runners[label] if t == 1 else OnnxRunner(path, threads=t)
                calls[label] = (r.run, r.cache_shape)
        for label in _reload_pte(runners, variants, art_names, t):
            calls[label] = (runners[label].run, runners[label].cache_shape)
        dec_fns = {n: lat.greedy_run(c, shape, DECODE_STEPS) for n, (c, shape) in calls.items()}
        pre_fns = {n: _call_fn(c, shape, pre_ids) for n, (c, shape) in calls.items()}
        peer_runs = {}
        for q, gguf in (llama[1] if llama else {}).items():
            name = f"llama.cpp {q} ({gguf.stat().st_size / 1e6:.1f} MB)"
            peer_runs[name] = (_LlamaBenchRun(llama[0], gguf, t, 0, DECODE_STEPS),
                               _LlamaBenchRun(llama[0], gguf, t, int(pre_ids.shape[1]), 0))
            dec_fns[name], pre_fns[name] = peer_runs[name]
        probes = roofline.bandwidth_calls(512)  # the DRAM limit, timed in the same rounds as the decode runs
        dec_fns.update({BANDWIDTH_TURN + k: fn for k, (fn, _) in probes.items()})
        dec = lat.interleaved(dec_fns, reps=reps, warmup=1, progress=progress, desc=f"decode x{DECODE_STEPS}, {t} thread(s)",
                              budget_s=budget_s)
        bw_timed = {k: dec.pop(BANDWIDTH_TURN + k) for k in probes}
        if all("min_ms" in r for r in bw_timed.values()):
            out.setdefault("bandwidth", {})[str(t)] = roofline.bandwidth_from_rounds(bw_timed, probes)
        del probes
        pre = lat.interleaved(pre_fns, reps=reps, progress=progress, desc=f"prefill, {t} thread(s)", burst=BURST,
                              budget_s=budget_s)
        rows = {}
        for n, (d_run, p_run) in peer_runs.items():
            rows[n] = {**d_run.row("decode"), **p_run.row("prefill")}
        for n in calls:
            d, p = dec.get(n, {}), pre.get(n, {})
            row = {k: v for k, v in (("decode_error", d.get("error")), ("prefill_error", p.get("error"))) if v}
            if "ms" in d:
                row.update(decode_s=d["ms"] / 1e3, decode_tok_s=DECODE_STEPS / (d["ms"] / 1e3), decode_n=d["n"])
            if "ms" in p:
                row.update(prefill_ms=p["ms"], prefill_tok_s=pre_ids.shape[1] / (p["ms"] / 1e3), prefill_n=p["n"])
            rows[n] = row
        out["threads"][str(t)] = rows
        del calls, dec_fns, pre_fns  # the .pte runners must be the last references to their programs
    _reload_pte(runners, variants, art_names, 1)
    return out


def _reload_pte(runners: dict, variants: dict, art_names: dict, threads: int) -> list[str]:
    """Load every opened .pte runner again with the ExecuTorch pool at ``threads`` (all of them go first: a loaded
    program keeps the pool it was loaded with, ``export.runners.executorch_threads``); returns their labels."""
    import gc

    from moe_export.export.runners import PteRunner, executorch_threads

    labels = [label for label, r in runners.items() if isinstance(r, PteRunner)]
    if not labels or all(runners[label].threads == threads for label in labels):
        return labels
    for label in labels:
        del runners[label]
        variants.pop(label, None)
    gc.collect()
    executorch_threads(threads)
    for label in labels:
        runners[label] = PteRunner(art_names[label], threads=threads)
        variants[label] = ("runner", runners[label])
    return labels


class _LlamaBenchRun:
    """One llama-bench test as a callable for the interleaved rounds; keeps llama-bench's own tok/s of each call."""

    def __init__(self, peer, gguf, threads: int, n_prompt: int, n_gen: int):
        self.peer, self.gguf, self.threads, self.n_prompt, self.n_gen = peer, gguf, threads, n_prompt, n_gen
        self.tok_s: list[float] = []

    def __call__(self):
        self.tok_s.append(self.peer.bench(self.gguf, self.threads, self.n_prompt, self.n_gen))

    def row(self, what: str) -> dict:
        if not self.tok_s:
            return {}
        return {f"{what}_tok_s": statistics.median(self.tok_s), f"{what}_n": len(self.tok_s)}


def _llama_cpp_models(peer, fmodel, out: Path, qtypes) -> dict:
    """``{type: gguf}`` of ``fmodel`` (saved as a float folder with a tokenizer, converted, quantized)."""
    from moe_export.zoo.registry import ENTRIES
    from moe_export.zoo.tokenizer import get_tokenizer

    hf = out / "hf"
    if not (hf / "config.json").exists():
        fmodel.save_pretrained(hf)
        # The weights are what is timed; any byte-level BPE of at most the model's vocabulary will do (the
        # converter pads the rest), so the smallest zoo tokenizer stands in for models that have none.
        entry = min(ENTRIES.values(), key=lambda e: e.vocab_size)
        get_tokenizer(entry.vocab_size, entry.corpora)[0].save_pretrained(hf)
    ggufs = peer.prepare(hf, out, list(qtypes))
    return {q: ggufs[q] for q in qtypes}


def _call_fn(call, cache_shape, tokens):
    k, v = torch.zeros(cache_shape), torch.zeros(cache_shape)
    pos = torch.zeros(1, dtype=torch.long)
    return lambda: call(tokens, pos, k, v)


def _throughput_roofline(res: dict, bw1: dict, bytes_float: float, bytes_quant: float, reps: int) -> None:
    """Per thread count: DRAM bandwidth and the cached bandwidth of one token's weights, and each throughput row's
    share of the limits they set (float and our exact-width rows; speed modes read other bytes)."""
    from moe_export.bench import roofline

    tp = res["throughput"]
    tp["roofline"] = {}
    for t, rows in tp["threads"].items():
        torch.set_num_threads(int(t))
        bw = tp.get("bandwidth", {}).get(t) or (bw1 if t == "1" else roofline.measure_bandwidth(512, reps=reps))
        cached = {"float": roofline.cache_resident_GBps(bytes_float), "quantized": roofline.cache_resident_GBps(bytes_quant)}
        tp["roofline"][t] = {"GBps": bw["GBps"], "in_rounds": bool(bw.get("in_rounds")), "cache_GBps_float": cached["float"],
                             "cache_GBps_quantized": cached["quantized"]}
        for name, row in rows.items():
            if "decode_tok_s" not in row:
                continue
            if name.startswith(("float", "onnx float")):
                which = "float"
            elif name.startswith("quantized") or name == "onnx quantized (packed)":
                which = "quantized"  # the plan's bytes, read as stored
            else:
                continue  # ORT's QMoE/MatMulNBits forms read other bytes (wider containers, float32 scales)
            nbytes = bytes_quant if which == "quantized" else bytes_float
            gbps = nbytes * row["decode_tok_s"] / 1e9
            row["read_GBps"] = gbps
            row["pct_of_dram_limit"] = 100 * gbps / bw["GBps"]
            row["pct_of_cache_limit"] = 100 * gbps / cached[which]
    torch.set_num_threads(1)


def _parity(runners: dict, art_rows: dict, qmodel, fmodel, vocab: int, tokens: int = 16) -> dict:
    """Logits of every quantized artifact vs eager quantized (prefill and token-by-token decode through the
    cache): SQNR and max abs error relative to the largest logit; SQNR vs the float model too."""
    from moe_export.eval import logits_fn_for
    from moe_export.export.parity import compare

    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(1))
    eager, flt = logits_fn_for(qmodel), logits_fn_for(fmodel)
    out = {}
    for label, runner in runners.items():
        if not label.startswith(("pte quantized", "onnx quantized")):
            continue
        try:
            rep = compare(runner, eager, ids, flt)
            out[label] = {"sqnr_vs_eager_db": rep.sqnr_vs_eager_db, "decode_sqnr_vs_eager_db": rep.decode_sqnr_vs_eager_db,
                          "max_rel_err_vs_eager": max(rep.max_abs_err_vs_eager, rep.decode_max_abs_err_vs_eager)
                          / max(rep.logit_scale, 1e-30),
                          "sqnr_vs_float_db": rep.sqnr_vs_float_db, "eager_sqnr_vs_float_db": rep.eager_sqnr_vs_float_db,
                          "approximate": _is_speed_mode(label),  # int8 activations (the bench exports at level 4)
                          "ops": art_rows.get(label, {}).get("ops")}
        except Exception as err:
            out[label] = {"error": f"{type(err).__name__}: {err}"[:200]}
    return out


def _is_ours(name: str) -> bool:
    return name.startswith(("quantized", "pte quantized", "onnx quantized"))


def _is_speed_mode(name: str) -> bool:
    """Modes that trade bytes or exactness for speed: int8 activations, wider containers (native: 3-bit in 4-bit
    codes)."""
    return "(fast)" in name or "(xnnpack-int)" in name or "(native)" in name


def _targets(res: dict) -> list[dict]:
    dec = res["latency"]["decode"]
    pl = res["plan"]
    out = []

    def ms(n):
        return dec.get(n, {}).get("ms")

    if ms("quantized compiled") and ms(BASELINE):
        sp = ms(BASELINE) / ms("quantized compiled")
        out.append({"target": f"quantized compiled decode >= 2x float compiled (experts {pl['mean_bits']:.2f} <= 3 avg bits)",
                    "value": f"{sp:.2f}x", "met": sp >= 2 and pl["mean_bits"] <= 3})
        alt = "float compiled (batched_mm)"
        if ms(alt):
            sp2 = ms(alt) / ms("quantized compiled")
            out.append({"target": f"(also) quantized compiled decode >= 2x {alt}, the fastest float decode", "value": f"{sp2:.2f}x",
                        "met": sp2 >= 2 and pl["mean_bits"] <= 3})
    pct = dec.get("quantized compiled", {}).get("pct_of_roofline")
    if pct is not None:
        out.append({"target": "quantized compiled decode >= 50% of the bandwidth limit", "value": f"{pct:.1f}%", "met": pct >= 50})
    tp1 = (res.get("throughput") or {}).get("threads", {}).get("1", {})
    if res["model"].get("slice") and tp1:
        q, f = tp1.get("quantized compiled", {}), tp1.get("float compiled", {})
        if q.get("decode_tok_s") and f.get("decode_tok_s"):
            r = q["decode_tok_s"] / f["decode_tok_s"]
            out.append({"target": f"1 thread: quantized compiled decode >= 5x float compiled ({DECODE_STEPS} steps)",
                        "value": f"{r:.2f}x ({q['decode_tok_s']:.1f} vs {f['decode_tok_s']:.1f} tok/s)", "met": r >= 5})
        if q.get("pct_of_dram_limit") is not None:
            out.append({"target": "1 thread: quantized compiled decode >= 50% of the DRAM limit",
                        "value": f"{q['pct_of_dram_limit']:.1f}%", "met": q["pct_of_dram_limit"] >= 50})
        if q.get("prefill_tok_s") and f.get("prefill_tok_s"):
            r = q["prefill_tok_s"] / f["prefill_tok_s"]
            out.append({"target": "1 thread: quantized compiled prefill >= float compiled", "value": f"{r:.2f}x",
                        "met": r >= 1})
    # the peer: our torch decode against llama.cpp's Q2_K (about our size) at each thread count
    for t, rows in sorted((res.get("throughput") or {}).get("threads", {}).items()):
        peer = next((n for n in rows if n.startswith("llama.cpp Q2_K") and rows[n].get("decode_tok_s")), None)
        for ours in ("quantized compiled", AOT):
            if peer and rows.get(ours, {}).get("decode_tok_s"):
                r = rows[ours]["decode_tok_s"] / rows[peer]["decode_tok_s"]
                out.append({"target": f"{t} thread(s): {ours} decode >= llama.cpp Q2_K ({DECODE_STEPS} steps)",
                            "value": f"{r:.2f}x ({rows[ours]['decode_tok_s']:.1f} vs {rows[peer]['decode_tok_s']:.1f} tok/s)",
                            "met": r >= 1})
    for kind in ("pte", "onnx"):
        fl = [n for n in dec if n.startswith(f"{kind} float") and "ms" in dec[n]]
        qs = [n for n in dec if n.startswith(f"{kind} quantized") and "ms" in dec[n]]
        for q in qs:
            if fl:
                r = dec[fl[0]]["ms"] / dec[q]["ms"]
                out.append({"target": f"{q} decode no slower than {fl[0]}", "value": f"{r:.2f}x", "met": r >= 1})
    # the native .pte's own targets: decode >= our compiled path and >= 2x the float .pte, prefill >= the float .pte
    pre = res["latency"].get("prefill", {})
    for q in (n for n in dec if n.startswith("pte quantized (native") and "ms" in dec[n]):
        if ms("quantized compiled"):
            r = ms("quantized compiled") / dec[q]["ms"]
            out.append({"target": f"{q} decode >= 1.0x quantized compiled", "value": f"{r:.2f}x", "met": r >= 1})
        fl = next((n for n in dec if n.startswith("pte float") and "ms" in dec[n]), None)
        if fl:
            r = dec[fl]["ms"] / dec[q]["ms"]
            out.append({"target": f"{q} decode >= 2x {fl}", "value": f"{r:.2f}x", "met": r >= 2})
            if pre.get(q, {}).get("ms") and pre.get(fl, {}).get("ms"):
                r = pre[fl]["ms"] / pre[q]["ms"]
                out.append({"target": f"{q} prefill >= {fl}", "value": f"{r:.2f}x", "met": r >= 1})
    ckpt = next((r["bytes"] for r in res["sizes"] if r["artifact"] == "quantized checkpoint"), None)
    for row in res["sizes"]:
        if row["artifact"].endswith("(native)") and ckpt:
            v = row["bytes"] / ckpt
            limit = NATIVE_SIZE_LIMIT["pte" if row["artifact"].startswith("pte") else "onnx"]
            out.append({"target": f"{row['artifact']} <= {limit:.2f}x the quantized checkpoint's bytes", "value": f"{v:.3f}",
                        "met": v <= limit})
        if "vs_theoretical" in row:
            v = row["vs_theoretical"]
            what = f"{row['artifact']} within 5% of theoretical size"
            if row.get("speed_mode"):
                what += " (speed mode: wider containers / float fallbacks by design)"
            out.append({"target": what, "value": f"{v:.3f}", "met": abs(v - 1) <= 0.05})
    return out
