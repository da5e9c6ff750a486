"""`moe-export eval MODEL`: bits per byte on held-out text and cloze accuracy of exactly what MODEL is."""

from __future__ import annotations

import click


@click.command(name="eval", help="Bits per byte on held-out text and cloze accuracy. MODEL is a zoo build folder or "
               "entry name, a float or quantized checkpoint folder, or an exported .pte / .onnx (scored through its "
               "runtime, within the cache length it was exported with).")
@click.argument("model")
@click.option("--which", type=click.Choice(["finetuned", "pretrained"]), default="finetuned", show_default=True,
              help="Checkpoint of a zoo build folder.")
@click.option("--against", "against", default=None,
              help="Score this model too (typically the float model MODEL was quantized from) and show the change.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--corpus", "corpora", multiple=True, help="Corpus to score (repeatable) [default: the build's two].")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Held-out tokens scored per corpus.")
@click.option("--n-cloze", type=int, default=200, show_default=True, help="Cloze items per corpus (0 to skip).")
@click.option("--seq-len", type=int, default=None, help="Context length [default: the training length].")
@click.option("--threads", type=int, default=1, show_default=True)
@click.option("--accuracy", type=click.Choice(["exact", "int8"]), default="exact", show_default=True,
              help="Arithmetic of the CPU kernels for a checkpoint: exact scores the quantized weights; int8 the "
              "int8-activation arithmetic inference runs by default. Exported artifacts run their own.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def command(model, which, against, json_out, corpora, max_tokens, n_cloze, seq_len, threads, accuracy, quiet):
    import torch

    from moe_export.evaluate import compare, evaluate_target, format_table, open_target
    from moe_export.io import CheckpointError, atomic_write_json

    torch.set_num_threads(threads)
    scored = []
    for path in [model] + ([against] if against else []):
        try:
            target = open_target(path, which, threads)
            if scored:  # the reference is scored on exactly the same windows and items
                corpora, seq_len = list(scored[0]["results"]), scored[0]["seq_len"]
            scored.append(evaluate_target(target, list(corpora) or None, seq_len, max_tokens, n_cloze,
                                          progress=not quiet, accuracy=accuracy))
        except (CheckpointError, ValueError) as err:
            raise click.ClickException(str(err)) from None
    res = scored[0]
    if against:
        res["against"] = scored[1]
        res["change"] = compare(res, scored[1])
    if json_out:
        atomic_write_json(json_out, res)
    click.echo(format_table(res, scored[1] if against else None))
