"""`moe-export bench [--quick] [--model tiny|small-mixtral|PATH] [-o OUTDIR]`."""

from __future__ import annotations

import click


@click.command(name="bench", help="Benchmark every runtime (eager, compiled, .pte, .onnx, torchao/ORT peers) of one model "
                                  "side by side: latency, bandwidth roofline, size, peak RSS, offline costs. "
                                  "Writes OUTDIR/results.json and results.md.")
@click.option("--quick", is_flag=True, help="Fewer runs and variants (a few minutes).")
@click.option("--model", default="tiny", show_default=True,
              help="Zoo entry (tiny, small-mixtral; a random model of its shape if not built), a slice of a real model's "
                   "shape with random weights (mixtral-slice, qwen3-slice), or a checkpoint folder.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/bench-MODEL].")
@click.option("--reps", type=int, default=None, help="Interleaved rounds per variant, 3 timed calls each [default: 10 quick, 30 full].")
@click.option("--avg-bits", type=float, default=2.5, show_default=True, help="Mean bits of the mixed plan.")
@click.option("--levels", default="3,2", show_default=True, help="Bit widths of the mixed plan.")
@click.option("--non-expert", default=None,
              help="Widths of non-expert weights, ROLE=float|BITS[:GROUP|row][:sym|asym] comma-separated, or 'float' "
                   "[default: attention=4,lm_head=8:row:sym].")
@click.option("--pte-modes", default=None, help="Quantized .pte modes, comma-separated [default: native quick and on "
                                                 "slices; native,packed,xnnpack,xnnpack-int full].")
@click.option("--onnx-modes", default=None, help="Quantized .onnx modes, comma-separated [default: packed,fast,native; slices: fast,native].")
@click.option("--threads", default="1,2", show_default=True,
              help="Thread counts of the throughput phase (64 greedy decode steps, 128-token prefill); 'none' skips it.")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(file_okay=False), default=None,
              help="A llama.cpp build folder (bin/llama-bench; tools/build_llama_cpp.sh makes one) [default: "
                   "$MOE_EXPORT_LLAMA_CPP]: the float model as GGUF k-quants joins the throughput phase.")
@click.option("--no-peers", is_flag=True, help="Skip the torchao / onnxruntime peers (slices skip them by default).")
@click.option("--no-export", is_flag=True, help="Skip the .pte / .onnx exports and their rows (the torch paths and "
                                                  "llama.cpp only).")
@click.option("--no-rss", is_flag=True, help="Skip the peak-RSS subprocesses.")
@click.option("--no-offline", is_flag=True, help="Skip plan/quantizer timings (slices skip them by default).")
@click.option("--docs", type=click.Path(dir_okay=False), default=None, help="Also write the markdown here (docs/benchmarks.md).")
def command(quick, model, out_dir, reps, avg_bits, levels, non_expert, pte_modes, onnx_modes, threads, llama_cpp, no_peers,
            no_export, no_rss, no_offline, docs):
    from moe_export.bench.run import DEFAULT_NON_EXPERT, run_bench
    from moe_export.plan.bitplan import NonExpertPolicy
    from moe_export.export.executorch import PTE_MODES
    from moe_export.export.onnx import ONNX_MODES

    if reps is not None and reps < 1:
        raise click.BadParameter(f"must be >= 1, got {reps}", param_hint="--reps")
    try:
        lv = [int(b) for b in levels.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated bit widths such as 3,2; got {levels!r}", param_hint="--levels")
    try:
        n_threads = () if threads.strip().lower() == "none" else tuple(int(t) for t in threads.split(",") if t.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated thread counts such as 1,2 (or none); got {threads!r}",
                                 param_hint="--threads")
    if any(t < 1 for t in n_threads):
        raise click.BadParameter(f"thread counts must be >= 1, got {threads!r}", param_hint="--threads")
    non_expert = DEFAULT_NON_EXPERT if non_expert is None else non_expert
    try:
        NonExpertPolicy.parse(non_expert, 128)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--non-expert")
    modes = {}
    for opt, given, allowed in (("--pte-modes", pte_modes, PTE_MODES), ("--onnx-modes", onnx_modes, ONNX_MODES)):
        if given is None:
            continue
        ms = [m.strip() for m in given.split(",") if m.strip()]
        bad = [m for m in ms if m not in allowed]
        if bad or not ms:
            raise click.BadParameter(f"unknown mode(s) {bad or given!r}; choose from {', '.join(allowed)}", param_hint=opt)
        modes[opt] = ms
    if no_export and modes:
        raise click.BadParameter("--no-export exports nothing; drop --pte-modes / --onnx-modes", param_hint="--no-export")
    from moe_export.bench.llama_cpp import LlamaCpp

    try:
        LlamaCpp.find(llama_cpp)  # a wrong folder is an error before an hour of benchmarking, not after
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="--llama-cpp")
    try:
        run_bench(model, out_dir, quick=quick, reps=reps, avg_bits=avg_bits, levels=lv, non_expert=non_expert,
                  pte_modes=modes.get("--pte-modes"), onnx_modes=modes.get("--onnx-modes"),
                  peers=False if no_peers else None, offline=False if no_offline else None, rss=not no_rss, docs=docs,
                  threads=n_threads, llama_cpp=llama_cpp, echo=click.echo, **({"targets": ()} if no_export else {}))
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="--model")
