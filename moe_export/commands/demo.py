"""``moe-export demo``: the README's main job, the tiny-demo recipe end to end."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="demo", help="Build (or reuse) the tiny zoo model, plan, quantize, compile, export to .pte and "
               ".onnx, check parity, and print one table. Same as `moe-export run tiny-demo`.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=Path("runs/demo"),
              show_default=True, help="Work folder.")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def command(output, threads, quiet):
    from moe_export.commands.run import run

    run("tiny-demo", output, 0, threads, quiet)
