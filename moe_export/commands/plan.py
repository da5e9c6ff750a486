"""``moe-export plan``: write a per-expert BitPlan JSON (and optionally its heatmap)."""

from __future__ import annotations

import time
from pathlib import Path

import click

METHOD_CHOICES = ["router+maxvar", "router", "maxvar", "weight-error", "frequency", "routing-weight", "pmq", "random", "uniform"]


def _levels(ctx, param, value):
    try:
        levels = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated bit widths such as 3,2 or 3,2,1; got {value!r}")
    if not levels or any(not 1 <= b <= 8 for b in levels):
        raise click.BadParameter(f"bit widths must lie in 1..8; got {value!r}")
    return levels


def _group(ctx, param, value):
    if value.lower() == "auto":
        return "auto"
    if value.lower() in ("none", "row", "null"):
        return None
    try:
        g = int(value)
    except ValueError:
        raise click.BadParameter(f"expected a positive integer or 'none' (whole row); got {value!r}")
    if g <= 0:
        raise click.BadParameter(f"group size must be positive; got {g}")
    return g


def _non_expert(items, group_size, symmetric):
    from moe_export.plan.bitplan import NonExpertPolicy

    try:
        return NonExpertPolicy.parse(items, group_size, symmetric)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--non-expert") from None


@click.command(name="plan", help="Per-expert bit plan (router-norm change + MaxVar, or a baseline) of MODEL_DIR, or with "
               "--budget one whole-model allocation of every tensor's width and group size.\n\n"
               "MODEL_DIR is a safetensors checkpoint folder, or a zoo build folder (pretrained/ + finetuned/: "
               "plans finetuned/ with pretrained/ as the reference).")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--avg-bits", type=float, default=None, help="Mean bits per routed expert in every MoE layer.")
@click.option("--budget", default=None, metavar="SIZE",
              help="One byte budget for the whole model instead of --avg-bits: bits per weight (2.7bpw) or a size "
                   "(5.1MB, 4.8MiB, 5100000B). Every expert projection, shared expert, attention, lm_head and "
                   "embedding weight gets its own width (1,2,3,4,6,8 or float) and group size (32,64,128), chosen "
                   "to minimise the error --usage names (see moe_export/plan/budget.py). --levels, when given, limits the "
                   "widths; --group-size, when given, the group sizes.")
@click.option("--usage", type=click.Choice(["uniform", "calibration", "activation", "fisher"]), default="activation",
              show_default=True,
              help="--budget: what weights each tensor's error. activation (the default, best measured in "
                   "docs/results.md section 3): the output error on calibration text's inputs (each weight's input "
                   "second moments, an expert's routed tokens only; --calib-corpus, --calib-tokens: the shipped "
                   "English text unless another corpus is named); uniform: data-free, expert usage top_k/E, no "
                   "forward pass; calibration: each expert's routing frequency on calibration text; fisher: every "
                   "weight's squared loss gradient on calibration text (diagonal Fisher).")
@click.option("--levels", default="3,2", show_default=True, callback=_levels, help="Candidate widths, e.g. 3,2 or 3,2,1.")
@click.option("--method", type=click.Choice(METHOD_CHOICES + ["budget"]), default=None,
              help="Allocation method [default: budget with --budget (the recommended whole-model allocation), "
                   "router+maxvar (the paper's per-layer method) with --avg-bits]. budget needs --budget.")
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Checkpoint before this training stage, for L_s = ||w_s(final)|| - ||w_s(ref)||. "
                   "Default: pretrained/ of a zoo build; none = final-norm proxy.")
@click.option("--zeta", type=float, default=3.0, show_default=True, help="MaxVar rearrangement threshold.")
@click.option("--maxvar-variant", type=click.Choice(["paper", "largest-norm-row"]), default="paper", show_default=True)
@click.option("--maxvar-order", type=click.Choice(["descending", "ascending"]), default="descending", show_default=True,
              help="--method maxvar: widest range first, or ascending (the official code's --order_type variance).")
@click.option("--absolute-change", is_flag=True, help="Rank by |L_s| instead of the signed change.")
@click.option("--group-size", default="auto", show_default=True, callback=_group,
              help="Quantizer group size, 'none' for whole rows, or auto: the largest of 128, 64, 32, 16 that divides "
                   "every expert input dim of the model.")
@click.option("--symmetric", is_flag=True, help="Symmetric quantization grid.")
@click.option("--quantizer", default="rtn", show_default=True, help="Quantizer the plan is for (rtn, hqq, gptq).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --method random and of calibration windows.")
@click.option("--router-weighting", type=float, default=0.0, show_default=True,
              help="weight-error: weight each expert's error by 1 + GAMMA * (max L - L_s)/(max L - min L).")
@click.option("--calib-corpus", default="shakespeare", show_default=True,
              help="Calibration corpus, one of the shipped ones (--budget's calibrated usages, "
                   "frequency/routing-weight/pmq).")
@click.option("--calib-tokens", type=int, default=8192, show_default=True)
@click.option("--calib-seq-len", type=int, default=128, show_default=True)
@click.option("--non-expert", "non_expert", multiple=True, metavar="ROLE=float|BITS[:GROUP|row][:sym|asym]",
              help="Policy for non-expert weights, repeatable or comma-separated (e.g. --non-expert attention=4 "
                   "--non-expert lm_head=8:row:sym); GROUP defaults to --group-size, the grid to --symmetric; "
                   "roles: attention, router, shared_experts, embeddings, lm_head, dense_mlp. Default: all float.")
@click.option("--name", default=None, help="Model name recorded in the plan (default: the folder name).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True, help="BitPlan JSON to write.")
@click.option("--heatmap", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Also write a layers x experts PNG.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or summary table.")
def command(model_dir, avg_bits, budget, usage, levels, method, reference, zeta, maxvar_variant, maxvar_order, absolute_change,
            group_size, symmetric, quantizer, seed, router_weighting, calib_corpus, calib_tokens, calib_seq_len,
            non_expert, name, output, heatmap, quiet):
    import torch

    from moe_export.io import CheckpointError
    from moe_export.models import UnsupportedModelError
    from moe_export.plan.allocation import AllocationError
    from moe_export.plan.bitplan import BitPlanError
    from moe_export.plan.budget import BudgetError
    from moe_export.plan.methods import CALIBRATED, PlanConfig, PlanError, make_plan, resolve_model_dir

    t0 = time.perf_counter()
    if method is None:
        method = "budget" if budget is not None else "router+maxvar"
    if (method == "budget") != (budget is not None):
        raise click.UsageError("--method budget goes with --budget SIZE, and --budget with no other method")
    if (budget is None) == (avg_bits is None):
        raise click.UsageError("give --avg-bits (mean expert width per layer) or --budget (whole-model size), not both"
                               if budget is not None else "missing a size: --budget SIZE (whole model, e.g. 2.7bpw: the "
                               "recommended allocation) or --avg-bits (mean expert width per layer, the paper's methods)")
    src = click.get_current_context().get_parameter_source
    try:
        ckpt_dir, ref = resolve_model_dir(model_dir, reference)
        if budget is not None:
            plan = _budget_plan(ckpt_dir, budget, usage, levels if src("levels").name == "COMMANDLINE" else None,
                                (group_size,) if src("group_size").name == "COMMANDLINE" else None, symmetric,
                                quantizer, seed, calib_corpus, calib_tokens, calib_seq_len,
                                name or Path(model_dir).resolve().name, quiet)
        else:
            if group_size == "auto":
                from moe_export.models import checkpoint_moe_layout
                from moe_export.plan.bitplan import DEFAULT_GROUP_SIZES, default_group_size, expert_in_dims

                dims = expert_in_dims(checkpoint_moe_layout(ckpt_dir))
                group_size = default_group_size(dims)
                click.echo(f"group size {group_size}: the largest of {', '.join(map(str, DEFAULT_GROUP_SIZES))} dividing "
                           f"every expert input dim ({', '.join(map(str, dims))}); --group-size to choose another")
            cfg = PlanConfig(avg_bits=avg_bits, levels=levels, method=method, zeta=zeta, maxvar_variant=maxvar_variant,
                             maxvar_order=maxvar_order,
                             absolute_change=absolute_change, group_size=group_size, symmetric=symmetric,
                             quantizer=quantizer, seed=seed, router_weighting=router_weighting,
                             non_expert=_non_expert(non_expert, group_size, symmetric))
            name = name or Path(model_dir).resolve().name
            if method in CALIBRATED:
                from moe_export.zoo.data import calibration_batches
                from moe_export.zoo.folders import load

                model, tok = load(ckpt_dir, which=None)
                windows = calibration_batches(tok, calib_tokens, calib_seq_len, seed=seed, corpus=calib_corpus)  # [B, S]
                batches = list(torch.split(windows, 8))
                plan = make_plan(model, cfg, batches=batches, model_name=name, progress=not quiet)
                plan.provenance["calibration"] = f"{calib_corpus}: {windows.numel()} tokens, seq {calib_seq_len}, seed {seed}"
            else:
                plan = make_plan(model_dir, cfg, reference=ref, model_name=name, progress=not quiet)
        plan.validate()
        plan.save(output)
        if heatmap is not None:
            from moe_export.plan.heatmap import save_heatmap

            save_heatmap(plan, heatmap)
    except (PlanError, AllocationError, BudgetError, BitPlanError, UnsupportedModelError, CheckpointError) as err:
        raise click.ClickException(str(err)) from None
    if not quiet:
        click.echo(plan.summary())
    click.echo(f"wrote {output}" + (f" and {heatmap}" if heatmap else "") + f" ({time.perf_counter() - t0:.1f} s)")


def _budget_plan(ckpt_dir, budget, usage, levels, groups, symmetric, quantizer, seed, calib_corpus, calib_tokens,
                 calib_seq_len, name, quiet):
    """``--budget``: load the model and solve the whole-model allocation (``plan.budget``)."""
    import torch

    from moe_export.plan.budget import BITS, GROUPS, BudgetConfig, budget_plan
    from moe_export.zoo.folders import load

    cfg = BudgetConfig(budget, quantizer=quantizer, symmetric=symmetric, bits=tuple(sorted(levels)) if levels else BITS,
                       groups=GROUPS if groups is None or groups == ("auto",) else groups,
                       weighting=usage if usage in ("fisher", "activation") else "usage")
    model, tok = load(ckpt_dir, which=None)
    batches = None
    if usage in ("calibration", "activation", "fisher"):
        from moe_export.zoo.data import calibration_batches

        windows = calibration_batches(tok, calib_tokens, calib_seq_len, seed=seed, corpus=calib_corpus)  # [B, S]
        batches = list(torch.split(windows, 8))
    plan = budget_plan(model, cfg, batches=batches, model_name=name, progress=not quiet)
    if batches is not None:
        plan.provenance["calibration"] = f"{calib_corpus}: {windows.numel()} tokens, seq {calib_seq_len}, seed {seed}"
    return plan
