"""`moe-export bench [--quick] [--model tiny|small-mixtral|PATH] [-o OUTDIR]`."""

from __future__ import annotations

import click


@click.command(name="bench", help="Benchmark every runtime (eager, compiled, .pte, .onnx, torchao/ORT peers) of one model "
                                  "side by side: latency, bandwidth roofline, size, peak RSS, offline costs. "
                                  "Writes OUTDIR/results.json and results.md.")
@click.option("--quick", is_flag=True, help="Fewer runs and variants (a few minutes).")
@click.option("--model", default="tiny", show_default=True,
              help="Zoo entry (tiny, small-mixtral; a random model of its shape if not built) or a checkpoint folder.")
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output folder [default: runs/bench-MODEL].")
@click.option("--reps", type=int, default=None, help="Timed runs per variant [default: 10 quick, 30 full].")
@click.option("--avg-bits", type=float, default=2.5, show_default=True, help="Mean bits of the mixed plan.")
@click.option("--levels", default="3,2", show_default=True, help="Bit widths of the mixed plan.")
@click.option("--no-peers", is_flag=True, help="Skip the torchao / onnxruntime peers.")
@click.option("--no-rss", is_flag=True, help="Skip the peak-RSS subprocesses.")
@click.option("--no-offline", is_flag=True, help="Skip plan/quantizer timings.")
@click.option("--docs", type=click.Path(dir_okay=False), default=None, help="Also write the markdown here (docs/benchmarks.md).")
def command(quick, model, out_dir, reps, avg_bits, levels, no_peers, no_rss, no_offline, docs):
    from moe_export.bench.run import run_bench

    if reps is not None and reps < 1:
        raise click.BadParameter(f"must be >= 1, got {reps}", param_hint="--reps")
    try:
        lv = [int(b) for b in levels.split(",") if b.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated bit widths such as 3,2; got {levels!r}", param_hint="--levels")
    try:
        run_bench(model, out_dir, quick=quick, reps=reps, avg_bits=avg_bits, levels=lv, peers=not no_peers,
                  offline=not no_offline, rss=not no_rss, docs=docs, echo=click.echo)
    except FileNotFoundError as err:
        raise click.BadParameter(str(err), param_hint="--model")
