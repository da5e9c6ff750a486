"""``moe-export run RECIPE``: the whole pipeline of one recipe (a shipped one from moe_export/recipes/, or a file)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="run", help="Run RECIPE (a recipe JSON path or a shipped recipe name) end to end: "
               "model, plan, quantize, compile, export, parity, one summary table.")
@click.argument("recipe")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Work folder (default: runs/<recipe name>).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the zoo model and the parity inputs.")
@click.option("--threads", type=int, default=None, help="torch threads (default: all cores).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Local folder holding the recipe's model (a recipe naming a hub id needs it; nothing is downloaded).")
@click.option("--memory-budget", type=float, default=None, metavar="GIB",
              help="Memory the run may use, in GiB (default: what is available). A checkpoint over half of it is "
                   "planned and quantized one layer at a time, and the run goes on from the packed model.")
def command(recipe, output, seed, threads, quiet, model_dir, memory_budget):
    run(recipe, output, seed, threads, quiet, model_dir, memory_budget)


def run(recipe, output, seed, threads, quiet, model_dir=None, memory_budget=None):
    import torch

    from moe_export.export.parity import ParityError
    from moe_export.io import CheckpointError
    from moe_export.models import UnsupportedModelError
    from moe_export.pipeline import run_recipe
    from moe_export.plan.allocation import AllocationError
    from moe_export.plan.bitplan import BitPlanError
    from moe_export.plan.methods import PlanError
    from moe_export.recipes import Recipe, RecipeError
    from moe_export.streaming import StreamingError

    if threads:
        torch.set_num_threads(threads)
    if memory_budget is not None and not memory_budget > 0:
        raise click.BadParameter(f"must be a positive number of GiB, got {memory_budget}", param_hint="--memory-budget")
    try:
        r = Recipe.load(recipe)
        run_recipe(r, output, seed=seed, progress=not quiet, echo=click.echo, model_dir=model_dir,
                   memory_budget=None if memory_budget is None else int(memory_budget * 2**30))
    except ParityError as err:
        raise click.ClickException(f"parity check failed: {err}") from None
    except (RecipeError, CheckpointError, PlanError, AllocationError, BitPlanError, UnsupportedModelError,
            StreamingError) as err:
        raise click.ClickException(str(err)) from None
