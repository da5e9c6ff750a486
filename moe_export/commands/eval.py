"""`moe-export eval MODEL_DIR`: bits per byte on held-out text and cloze accuracy, as JSON."""

from __future__ import annotations

import click


@click.command(name="eval", help="Bits per byte on held-out text and multiple-choice (cloze) accuracy of a model. "
               "MODEL_DIR is a zoo build folder, a checkpoint folder, or a zoo entry name.")
@click.argument("model_dir")
@click.option("--which", type=click.Choice(["finetuned", "pretrained"]), default="finetuned", show_default=True,
              help="Checkpoint of a zoo build folder.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Write the results here.")
@click.option("--corpus", "corpora", multiple=True, help="Corpus to score (repeatable) [default: the build's two].")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Held-out tokens scored per corpus.")
@click.option("--n-cloze", type=int, default=200, show_default=True, help="Cloze items per corpus (0 to skip).")
@click.option("--seq-len", type=int, default=None, help="Context length [default: the training length].")
@click.option("--threads", type=int, default=1, show_default=True)
def command(model_dir, which, json_out, corpora, max_tokens, n_cloze, seq_len, threads):
    import json

    import torch

    from moe_export.eval import evaluate_checkpoint
    from moe_export.io import atomic_write_json
    from moe_export.zoo.train import resolve

    torch.set_num_threads(threads)
    try:
        path = resolve(model_dir, which)
    except FileNotFoundError as err:
        raise click.ClickException(str(err))
    res = evaluate_checkpoint(path, list(corpora) or None, seq_len, max_tokens, n_cloze)
    if json_out:
        atomic_write_json(json_out, res)
    click.echo(json.dumps(res, indent=2))
