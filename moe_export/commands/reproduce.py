"""`moe-export reproduce`: rerun the paper-claim experiments and rewrite docs/results.md."""

from __future__ import annotations

import shlex
from dataclasses import replace

import click


@click.command(name="reproduce", help="Regenerate docs/results.md (the paper's claims on models trained here).")
@click.option("--quick", is_flag=True, help="Fewer seeds and test samples: a few minutes on 2 CPU cores.")
@click.option("--out", "out_dir", default="docs", show_default=True, type=click.Path(file_okay=False),
              help="Folder that receives results.md, results-synthetic.json and img/*.png.")
@click.option("--seeds", default=None, help="Comma-separated seeds (default: 0-2 with --quick, 0-4 otherwise).")
@click.option("--routing", "routings", multiple=True, type=click.Choice(["token_choice", "expert_choice"]),
              help="Routing(s) of the synthetic MoE (default: both).")
@click.option("--from-json", "from_json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Rebuild the report from a saved results-synthetic.json without rerunning.")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def command(quick, out_dir, seeds, routings, from_json, threads):
    import torch

    from moe_export.repro import experiments, report

    torch.set_num_threads(threads)
    cmd = "moe-export reproduce" + (" --quick" if quick else "") + f" --out {shlex.quote(out_dir)}"
    cmd += (f" --seeds {seeds}" if seeds else "") + "".join(f" --routing {r}" for r in routings)
    if from_json:
        results = report.load_results(from_json)
    else:
        sweep = experiments.QUICK if quick else experiments.FULL
        if seeds:
            try:
                sweep = replace(sweep, seeds=tuple(int(s) for s in seeds.split(",")))
            except ValueError:
                raise click.BadParameter(f"{seeds!r}: give integers separated by commas, e.g. 0,1,2", param_hint="--seeds")
        if routings:
            sweep = replace(sweep, routings=tuple(routings))
        results = experiments.run_synthetic(sweep)
    md = report.write_report(results, out_dir, cmd)
    click.echo(f"wrote {md} ({len(results['runs'])} synthetic runs, {results['wall_s']:.0f} s)")
