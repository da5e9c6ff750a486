"""`moe-export reproduce`: rerun the paper-claim experiments and rewrite docs/results.md."""

from __future__ import annotations

import shlex
from dataclasses import replace

import click


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give integers separated by commas, e.g. 0,1,2", param_hint=option)


@click.command(name="reproduce", help="Regenerate docs/results.md (the paper's claims on models trained here).")
@click.option("--quick", is_flag=True, help="Fewer seeds, test samples and bit levels: minutes on 2 CPU cores.")
@click.option("--out", "out_dir", default="docs", show_default=True, type=click.Path(file_okay=False),
              help="Folder that receives results.md, results-*.json and img/*.png.")
@click.option("--seeds", default=None, help="Synthetic-task seeds, comma-separated (default: 0-2 with --quick, 0-9).")
@click.option("--routing", "routings", multiple=True, type=click.Choice(["token_choice", "expert_choice"]),
              help="Routing(s) of the synthetic MoE (default: both).")
@click.option("--zoo/--no-zoo", default=True, show_default=True, help="Also run the sweep on zoo models.")
@click.option("--zoo-models", default="tiny", show_default=True,
              help="Zoo entries, comma-separated; NAME@S1+S2 gives that entry its own build seeds (e.g. tiny,tiny-switch@0).")
@click.option("--zoo-seeds", default=None, help="Zoo build seeds, comma-separated (default: 0 with --quick, 0,1,2).")
@click.option("--from-json", "from_json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Rebuild the report from a saved results-synthetic.json without rerunning the synthetic task.")
@click.option("--zoo-json", "zoo_json", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Rebuild the zoo section from a saved results-zoo.json without rerunning it.")
@click.option("--controls/--no-controls", default=True, show_default=True,
              help="Run the repeat and same-domain control fine-tunes per zoo model (--no-controls still reports "
                   "those already in the resume cache).")
@click.option("--threads", default=1, show_default=True, help="torch threads.")
def command(quick, out_dir, seeds, routings, zoo, zoo_models, zoo_seeds, from_json, zoo_json, controls, threads):
    import torch

    from moe_export.repro import experiments, report, zoo_sweep

    torch.set_num_threads(threads)
    seed_t = _ints(seeds, "--seeds") if seeds else None
    zoo_seed_t = _ints(zoo_seeds, "--zoo-seeds") if zoo_seeds else None
    models, model_seeds = [], {}
    for spec in (m.strip() for m in zoo_models.split(",") if m.strip()):
        name, _, seeds_txt = spec.partition("@")
        models.append(name)
        if seeds_txt:
            model_seeds[name] = _ints(seeds_txt.replace("+", ","), "--zoo-models")
    models = tuple(models)
    if zoo and not zoo_json:
        from moe_export.zoo.registry import ENTRIES

        bad = [m for m in models if m not in ENTRIES]
        if bad:
            raise click.BadParameter(f"unknown zoo entry {bad[0]!r}; available: {', '.join(ENTRIES)}",
                                     param_hint="--zoo-models")

    cmd = "moe-export reproduce" + (" --quick" if quick else "") + f" --out {shlex.quote(out_dir)}"
    cmd += (f" --seeds {seeds}" if seeds else "") + "".join(f" --routing {r}" for r in routings)
    cmd += "" if zoo else " --no-zoo"
    cmd += (f" --zoo-models {zoo_models}" if zoo and zoo_models != "tiny" else "")
    cmd += (f" --zoo-seeds {zoo_seeds}" if zoo and zoo_seeds else "")
    cmd += "" if controls or not zoo else " --no-controls"

    cmd += (f" --from-json {shlex.quote(from_json)}" if from_json else "")
    cmd += (f" --zoo-json {shlex.quote(zoo_json)}" if zoo_json else "")
    if from_json:
        results = report.load_results(from_json)
    else:
        sweep = experiments.QUICK if quick else experiments.FULL
        if seed_t:
            sweep = replace(sweep, seeds=seed_t)
        if routings:
            sweep = replace(sweep, routings=tuple(routings))
        results = experiments.run_synthetic(sweep)
        results["command"] = cmd

    zoo_results = None
    if zoo_json:
        zoo_results = report.load_results(zoo_json)
    elif zoo:
        zs = zoo_sweep.QUICK if quick else zoo_sweep.FULL
        zs = replace(zs, models=models, model_seeds=model_seeds, controls=controls,
                     **({"seeds": zoo_seed_t} if zoo_seed_t else {}))
        from moe_export.paths import moe_export_home

        # finished (model, seed) records are kept outside the repo so an interrupted sweep resumes
        zoo_results = zoo_sweep.run_zoo(zs, cache_dir=moe_export_home() / "reproduce")
        zoo_results["command"] = cmd
    md = report.write_report(results, out_dir, cmd, zoo=zoo_results)
    extra = f", zoo {zoo_results['wall_s']:.0f} s" if zoo_results else ""
    click.echo(f"wrote {md} ({len(results['runs'])} synthetic runs, {results['wall_s']:.0f} s{extra})")
