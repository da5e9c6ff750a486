"""The markdown of a :func:`moe_export.bench.run.run_bench` result (``results.md``, ``docs/benchmarks.md``)."""

from __future__ import annotations


def _f(x, fmt=".2f", none="-"):
    return none if x is None else format(x, fmt)


def _latency_table(res: dict, key: str, with_roofline: bool) -> list[str]:
    dec, pre = res[key]["decode"], res[key]["prefill"]
    base = res["settings"]["baseline"]
    reps = res["settings"]["reps"]
    head = f"| variant | decode ms | decode vs {base} |" + (" % of bandwidth limit (DRAM / cached) |" if with_roofline else "") \
        + f" prefill ({res['settings']['prefill_tokens']} tok) ms | prefill vs {base} | first call s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    short = False
    for name in dec:
        d, p = dec[name], pre.get(name, {})
        if "error" in d:
            lines.append(f"| {name} | error: {d['error']} |" + " |" * (head.count("|") - 3))
            continue
        full = reps * res["settings"].get("burst", 1)
        pre_ms = _f(p.get("ms"), ".2f")
        if "ms" in p and p.get("n", full) < full:
            pre_ms += f" (n={p['n']})"
            short = True
        dec_ms = _f(d.get("ms"), ".3f")
        if d.get("n", full) < full:
            dec_ms += f" (n={d['n']})"
            short = True
        cells = [name, dec_ms, _f(d.get("speedup_vs_baseline"), ".2f") + "x"]
        if with_roofline:
            cells.append(f"{_f(d.get('pct_of_roofline'), '.1f')} / {_f(d.get('pct_of_cache_roofline'), '.1f')}"
                         if "pct_of_roofline" in d else "-")
        cells += [pre_ms, _f(p.get("speedup_vs_baseline"), ".2f") + "x" if "ms" in p else p.get("error", "-"),
                  _f(d.get("first_call_s"), ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    if short:
        lines += ["", "(n=...): a slow runtime timed fewer times (a time budget per variant), still interleaved."]
    return lines


def _section(title: str, intro: str, cols: list[str]) -> list[str]:
    return [f"## {title}", "", intro, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def _error_row(label: str, error: str, n_cols: int) -> str:
    return f"| {label} | error: {error} |" + " |" * (n_cols - 2)


def _width(v) -> str:
    g = v.get("group_size")
    return f"{v['bits']}-bit {'per-row' if g is None else f'g{g}'} {'sym' if v.get('symmetric') else 'asym'}"


def plan_line(pl: dict) -> str:
    ne = pl.get("non_expert") or {}
    ne_s = ", ".join(f"{role} {_width(v)}" for role, v in ne.items()) or "none"
    floats = "router, norms, embeddings" if "embeddings" not in ne else "router, norms"
    line = (f"Plan: {pl['method']} experts, levels {pl['levels']}, mean {pl['mean_bits']:.3f} bits"
            f"{' (' + format(pl['expert_bits_per_weight'], '.3f') + ' bits a weight with scales/zeros)' if 'expert_bits_per_weight' in pl else ''}, "
            f"RTN group {pl['group_size']} {'symmetric' if pl.get('symmetric') else 'asymmetric'}; "
            f"non-expert quantized: {ne_s}; float: {floats if ne else 'every non-expert weight'}")
    if "model_bits_per_weight" in pl:
        line += f"; whole model {pl['model_bits_per_weight']:.2f} bits a weight (theoretical size / {pl['params']:,} parameters)"
    return line + "."


def _throughput_section(res: dict) -> list[str]:
    tp = res.get("throughput")
    if not tp:
        return []
    roof = tp.get("roofline") or {}
    cols = ["variant", "threads", f"decode tok/s ({tp['decode_steps']} steps)", f"prefill tok/s ({tp['prefill_tokens']} tok)",
            "weights read GB/s", "% of DRAM limit", "% of cache limit"]
    lines = _section("Throughput (llama-bench protocol)",
                     f"Decode: {tp['decode_steps']} greedy steps from an empty cache (llama-bench `-p 0 -n "
                     f"{tp['decode_steps']}`), tok/s = steps / wall time of the run; prefill: one {tp['prefill_tokens']}-token "
                     f"step from an empty cache. Median of {tp['reps']} interleaved runs per thread count. GB/s = the plan's "
                     "weight bytes per token (Roofline) x tok/s, for float and our exact-width forms (ORT's QMoE/MatMulNBits "
                     "forms read other bytes). .pte rows: the ExecuTorch runtime's threadpool at that size (the programs are loaded again). "
                     "llama.cpp rows (when a build was given): the float model converted to GGUF and quantized to that "
                     "k-quant (one type for all experts of a layer), one `llama-bench -r 1` run per turn in the same "
                     "rounds, llama-bench's own tok/s.",
                     cols)
    for t, rows in tp["threads"].items():
        for name, r in rows.items():
            dec = _f(r.get("decode_tok_s"), ".1f", r.get("decode_error", "-"))
            pre = _f(r.get("prefill_tok_s"), ".1f", r.get("prefill_error", "-"))
            lines.append(f"| {name} | {t} | {dec} | {pre} | {_f(r.get('read_GBps'), '.2f')} | "
                         f"{_f(r.get('pct_of_dram_limit'), '.1f')} | {_f(r.get('pct_of_cache_limit'), '.1f')} |")
    if roof:
        lines += ["", "Limits per thread count: " + "; ".join(
            f"{t} thread(s): DRAM {r['GBps']:.2f} GB/s, cached {r['cache_GBps_quantized']:.1f} GB/s (quantized token) / "
            f"{r['cache_GBps_float']:.1f} GB/s (float token)" for t, r in roof.items()) + "."]
        if any(r.get("in_rounds") for r in roof.values()):
            lines[-1] += (" The DRAM limit is measured in the decode rounds themselves (a sum and a copy of a 512 MB "
                          "buffer as two more turns of every round, the fastest round of each), so the limit and the "
                          "decode runs see the same load.")
    lines.append("")
    return lines


def _llc_line(r: dict) -> list[str]:
    llc = r.get("llc_bytes")
    if not llc:
        return ["Last-level cache: not reported by this machine.", ""]
    mb = llc / (1 << 20)

    def fit(nbytes):
        return f"{nbytes / 1e6:.1f} MB ({'fits' if nbytes <= llc else 'does not fit'})"

    line = (f"Last-level cache {mb:.0f} MiB (sysfs). Weights read per decoded token: quantized "
            f"{fit(r['bytes_quantized']['weights'])}, float {fit(r['bytes_float']['weights'])}")
    if "model_bytes_quantized" in r:
        line += (f"; the whole model (every expert, which a run of decode steps reaches): quantized "
                 f"{fit(r['model_bytes_quantized'])}, float {fit(r['model_bytes_float'])}. A model that fits runs "
                 f"cache-resident between steps (the cached limit applies); one that does not reads DRAM")
    return [line + ".", ""]


def format_markdown(res: dict) -> str:
    m, s, pl = res["model"], res["settings"], res["plan"]
    impl = m.get("experts_implementation")
    cmd = s["command"]
    out = [
        f"# Benchmarks: {m['model']}",
        "",
        f"Generated by `{cmd}` "
        f"(torch {s['torch']}, {s['threads']} thread, {s['machine']}{', ' + s['cpu_model'] if s.get('cpu_model') else ''}"
        f"{', CPU kernels ' + s['kernel_path'] + ' / ' + s.get('accuracy', 'exact') if s.get('kernel_path') else ''}). "
        f"Model: {m['source']}, "
        f"{m['parameters']:,} parameters{'' if m.get('trained') else ' (random weights: timings and sizes only)'}"
        f"{'; float experts implementation: ' + impl if impl else ''}.",
        "",
        plan_line(pl),
        "",
        f"Latency: {s['reps']} interleaved rounds after a first call and 2 warm-up calls per variant; in each round every "
        f"variant runs one untimed call and then {s.get('burst', 1)} timed calls back to back (decode steps run back to "
        f"back in use), median of the {s['reps'] * s.get('burst', 1)} timed calls; every compiled variant has its own "
        f"compile cache (no variant pays for another's guards); "
        f"decode = 1 token at position {s['decode_position']} of a static {s['max_seq_len']}-slot KV cache; "
        f"ratios = {s['baseline']} ms / variant ms (> 1 is faster). Absolute times on this shared CPU are noisy; read the ratios.",
        "",
        "## Whole model",
        "",
        *_latency_table(res, "latency", True),
        "",
        "## One MoE block (layer 0)",
        "",
        *_latency_table(res, "block", False),
        "",
        *_throughput_section(res),
    ]
    par = res.get("parity")
    if par:
        cols = ["artifact", "kind", "SQNR vs eager prefill / decode dB", "max abs err / max logit",
                "SQNR vs float dB (eager quantized)"]
        out += _section("Parity of the exported artifacts",
                        "Logits on 16 tokens (prefill, and one token at a time through the KV cache) against the eager "
                        "quantized model. Exact modes should be at float rounding; speed modes with int8 activations are "
                        "approximate (an SQNR, not a tolerance).", cols)
        for label, p in par.items():
            if "error" in p:
                out.append(_error_row(label, p["error"], len(cols)))
                continue
            kind = "approximate (int8 activations)" if p.get("approximate") else "exact"
            out.append(f"| {label} | {kind} | {p['sqnr_vs_eager_db']:.1f} / {p['decode_sqnr_vs_eager_db']:.1f} | "
                       f"{p['max_rel_err_vs_eager']:.1e} | {_f(p.get('sqnr_vs_float_db'), '.1f')} "
                       f"({_f(p.get('eager_sqnr_vs_float_db'), '.1f')}) |")
        out.append("")
    prof = res.get("step_profile")
    if prof:
        cols = ["variant", "ms per step (profiled)", "weight kernels ms", "compiled graph ms", "dynamo frame and guards ms",
                "other ops ms", "weight kernels alone, % of bandwidth limit"]
        out += _section("Where a compiled decode step spends its time",
                        "torch.profiler self times per step (the profiler adds a little per recorded op: read the shares). "
                        "weight kernels = every op that multiplies by a weight; compiled graph = inductor's wrapper and its "
                        "fused kernels (norms, rotary, attention, KV cache); dynamo frame and guards = cache lookup and "
                        "prologue.", cols)
        for name, p in prof.items():
            if "error" in p:
                out.append(_error_row(name, p["error"], len(cols)))
                continue
            b = p["buckets"]
            out.append(f"| {name} | {p['ms_per_step']:.3f} | {b.get('weight kernels', 0):.3f} | {b.get('compiled graph', 0):.3f} | "
                       f"{b.get('dynamo frame and guards', 0):.3f} | {b.get('other ops', 0):.3f} | "
                       f"{_f(p.get('weight_kernels_pct_of_roofline'), '.1f')} |")
        for name, p in prof.items():
            if "top" in p:
                out.append("")
                out.append(f"{name}, largest ops: " + "; ".join(f"{t['op']} {t['ms']:.3f} ms ({t['calls']:.0f}x)" for t in p["top"][:6]))
        out.append("")
    r = res.get("roofline")
    if r:
        bw = r["bandwidth"]
        out += [
            "## Roofline",
            "",
            f"Bandwidth measured in this run (1 thread, {bw['buffer_MB']} MB buffers, larger than the last-level cache): "
            f"copy {bw['copy_GBps']:.2f} GB/s, sum {bw['sum_GBps']:.2f} GB/s; the limit uses {bw['GBps']:.2f} GB/s (DRAM). "
            f"A decode step's weights that fit in this CPU's caches stay there between steps, so the table also gives the "
            f"limit at the bandwidth of summing a buffer of that size again and again (cached). Quantized bytes follow the "
            f"plan (experts and the quantized non-expert weights packed); speed modes and peers read other bytes and get no "
            f"percentage.",
            "",
            "| weights read per decoded token | routed experts (top-k, mean expert) | non-expert | total | limit ms (DRAM) | cached GB/s | limit ms (cached) |",
            "|---|---|---|---|---|---|---|",
            f"| float | {r['bytes_float']['routed_experts'] / 1e6:.3f} MB | {r['bytes_float']['non_expert'] / 1e6:.3f} MB | "
            f"{r['bytes_float']['weights'] / 1e6:.3f} MB | {r['limit_ms_float']:.4f} | {_f(r.get('cache_GBps_float'), '.1f')} | "
            f"{_f(r.get('cache_limit_ms_float'), '.4f')} |",
            f"| quantized | {r['bytes_quantized']['routed_experts'] / 1e6:.3f} MB | {r['bytes_quantized']['non_expert'] / 1e6:.3f} MB | "
            f"{r['bytes_quantized']['weights'] / 1e6:.3f} MB | {r['limit_ms_quantized']:.4f} | {_f(r.get('cache_GBps_quantized'), '.1f')} | "
            f"{_f(r.get('cache_limit_ms_quantized'), '.4f')} |",
            "",
            f"The static KV cache adds {r['bytes_float']['kv_cache_per_128'] / 1e6:.3f} MB read per step (not in the limit).",
            "",
            *_llc_line(r),
        ]
    out += ["## Size and peak memory", "",
            "| artifact | MB on disk | theoretical MB | vs theoretical | peak RSS MB | RSS over imports MB |",
            "|---|---|---|---|---|---|"]
    for row in res.get("sizes", []):
        rss = row.get("rss") or {}
        rss_s = (f"{rss['peak_MB']:.0f} | {rss['delta_MB']:.1f}" if "peak_MB" in rss
                 else (f"error: {rss['error']} | -" if "error" in rss else "- | -"))
        th = row.get("theoretical_bytes")
        out.append(f"| {row['artifact']} | {row['bytes'] / 1e6:.3f} | {_f(th / 1e6 if th else None, '.3f')} | "
                   f"{_f(row.get('vs_theoretical'), '.3f')} | {rss_s} |")
    out.append("")
    peers = res.get("peers")
    if peers:
        out += ["## Peers", ""]
        for name, p in peers.items():
            if "error" in p:
                out.append(f"- {name}: error: {p['error']}")
            elif "matmulnbits_nodes" in p:
                out.append(f"- {name}: {p['bytes'] / 1e6:.3f} MB, {p['matmulnbits_nodes']} MatMulNBits nodes, "
                           f"{p['matmul_nodes_left']} MatMul/Gemm left float (gathered expert weights are not initializers)")
            else:
                out.append(f"- {name}: experts hold {p['expert_bytes'] / 1e6:.3f} MB (int8 storage of int4 values); experts run "
                           "dense (every expert on every token) as per-expert nn.Linear"
                           + ("; eager only in --quick (its compile takes minutes)" if s["quick"] else ""))
        out.append("")
    off = res.get("offline")
    if off:
        out += ["## Offline costs", "", "| plan method | calibrated | seconds |", "|---|---|---|"]
        for row in off["plan"]:
            out.append(f"| {row['method']} | {'yes (' + str(row.get('calibration_tokens')) + ' tokens)' if row['calibrated'] else 'no'} | "
                       f"{_f(row.get('s'), '.2f', row.get('error', '-'))} |")
        out += ["", "| quantizer | seconds | expert weights/s |", "|---|---|---|"]
        for row in off["quantize"]:
            out.append(f"| {row['quantizer']} | {_f(row.get('s'), '.2f', row.get('error', '-'))} | {_f(row.get('weights_per_s'), ',.0f')} |")
        out.append("")
    out += ["## Targets", "", "| target | value | met |", "|---|---|---|"]
    for t in res.get("targets", []):
        out.append(f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |")
    for stage, err in (res.get("errors") or {}).items():
        out.append(f"\nError in {stage}: {err}")
    load = [res.get("settings", {}).get(k) for k in ("load_avg_start", "load_avg_end")]
    load_txt = (f" 1-minute load average {load[0]:.1f} at the start and {_f(load[1], '.1f')} at the end, on "
                f"{res['settings'].get('cpus')} CPUs; the run itself adds about 1, the rest is other jobs on the machine." if load[0] is not None else "")
    out += ["", (f"Wall time of the run: {res['wall_s']:.0f} s." if "wall_s" in res else "Partial run (stopped before the end).")
            + load_txt, ""]
    return "\n".join(out)
