"""``moe-export quantize MODEL_DIR --plan plan.json [--quantizer rtn|hqq|gptq] [--calib-tokens N] -o QDIR``."""

from __future__ import annotations

import time
from pathlib import Path

import click


def _is_quantized_output(folder: Path) -> bool:
    """A folder a finished (or nearly finished) `moe-export quantize` wrote: its plan, or its config's marker."""
    import json

    if (folder / "bitplan.json").is_file():
        return True
    try:
        qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == "moe_export"


def _made_for_another_model(err, plan_path: Path, model_dir: Path, src: Path) -> str:
    """The router-hash refusal in the command line's terms: what the plan was made for, and the commands out."""
    import json

    plan, model = err.plan, err.plan.model
    arch = (json.loads((src / "config.json").read_text()).get("architectures") or ["?"])[0]
    made_for = " ".join(x for x in (model.get("architecture"), repr(model["name"]) if model.get("name") else "") if x)
    g = plan.quantizer.group_size
    if plan.budget is not None:  # a whole-model plan: re-plan the same budget, not its derived expert mean
        replan = f"moe-export plan {model_dir} --budget {plan.budget['bits_per_weight']:g}bpw -o NEW_PLAN.json"
    else:
        replan = (f"moe-export plan {model_dir} --avg-bits {plan.target_avg_bits:g} --levels "
                  f"{','.join(map(str, plan.levels))} --group-size {'none' if g is None else g} -o NEW_PLAN.json")
    return (f"{plan_path} was made for another checkpoint: {made_for or 'a model'} with router hash "
            f"{model['router_sha256'][:12]}..., while {src} is {arch} with router hash {err.got[:12]}...; "
            f"re-plan this checkpoint with `{replan}`, or, to apply the plan to these weights anyway, set "
            f"\"router_sha256\": \"\" under \"model\" in {plan_path}")


@click.command(name="quantize", help="Quantize MODEL_DIR by a bit plan into a packed checkpoint folder QDIR.")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--plan", "plan_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="BitPlan JSON written by `moe-export plan`.")
@click.option("--quantizer", default=None, help="rtn, hqq or gptq (default: the plan's quantizer).")
@click.option("--calib-tokens", type=int, default=None, help="Calibration tokens for data-aware quantizers (gptq).")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder to write (model.safetensors, bitplan.json, config.json, tokenizer).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@click.option("--streaming/--no-streaming", default=None, help="Read and write one layer at a time (rtn/hqq; default: "
              "when the checkpoint is over half the free memory or under torchrun). See moe_export/streaming.py.")
def command(model_dir: Path, plan_path: Path, quantizer, calib_tokens, output: Path, quiet: bool, streaming):
    import torch

    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.checkpoint import save_quantized
    from moe_export.io import CheckpointError
    from moe_export.loading import load_float_model, model_folder
    from moe_export.models import UnsupportedModelError
    from moe_export.plan.bitplan import BitPlan, BitPlanError, RouterMismatchError
    from moe_export.quant.base import available_quantizers
    from moe_export.size import expert_bytes, safetensors_bytes, theoretical_expert_bytes, theoretical_model_bytes

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:  # the plan against this checkpoint (layers, expert counts, group size, router hash) before any work
        src = model_folder(model_dir)
        plan = BitPlan.load(plan_path, against=src)
    except RouterMismatchError as err:
        raise click.ClickException(_made_for_another_model(err, plan_path, model_dir, src)) from None
    except (BitPlanError, CheckpointError, UnsupportedModelError) as err:
        raise click.ClickException(str(err)) from None
    name = quantizer or plan.quantizer.name
    if name not in available_quantizers():
        raise click.ClickException(f"unknown quantizer {name!r}; choose one of {available_quantizers()}")
    calibration = None
    if calib_tokens is not None:
        from moe_export.quant.calibration import CalibrationConfig

        calibration = CalibrationConfig(n_tokens=calib_tokens)
    import contextlib

    from moe_export.distributed import launched_by_torchrun
    from moe_export.io import OutputFolderError, check_output_folder, output_lock
    from moe_export.streaming import INDEX, should_stream

    shards = "model-*-of-*.safetensors"  # streaming.SHARD's names
    try:
        check_output_folder(output, sources=(model_dir, src), ours=_is_quantized_output,
                            partial=("model.safetensors", shards, INDEX, ".*.tmp"))
        # under torchrun every rank writes its own shards into the one folder, coordinated by the process group
        with contextlib.nullcontext() if launched_by_torchrun() else output_lock(output):
            if should_stream(src, name, streaming):
                return stream(src, plan_path, name, output, quiet)
            t0 = time.perf_counter()
            model = load_float_model(src)
            try:
                quantize_(model, MoEQuantConfig(plan, quantizer=name, calibration=calibration), progress=not quiet)
            except (BitPlanError, ValueError) as err:
                raise click.ClickException(str(err)) from None
            # a streamed checkpoint this run replaces: its index first (it marks a folder complete), then its shards
            for stale in [output / INDEX, *sorted(output.glob(shards))]:
                stale.unlink(missing_ok=True)
            save_quantized(model, output, plan=plan, source_dir=src)
    except (CheckpointError, OutputFolderError) as err:
        raise click.ClickException(str(err)) from None
    got, want = safetensors_bytes(output), theoretical_model_bytes(model)
    widths = (f"{plan.mean_bits():.3f} mean expert bits" if plan.budget is None else
              f"{8 * want / plan.budget['parameters']:.3f} bits/weight whole model, budget "
              f"{plan.budget['bits_per_weight']:g}")
    click.echo(
        f"quantized {src} with {name} ({widths}) -> {output} in "
        f"{time.perf_counter() - t0:.1f}s\n"
        f"  experts in memory {expert_bytes(model) / 1e6:.3f} MB (theoretical {theoretical_expert_bytes(model, plan) / 1e6:.3f} MB); "
        f"file {got / 1e6:.3f} MB (theoretical {want / 1e6:.3f} MB, {100 * (got / want - 1):+.2f}%)"
    )


def stream(src, plan_path, quantizer: str, output, quiet: bool) -> None:
    """Body of ``moe-export quantize --streaming`` (and of every rank under torchrun)."""
    from moe_export.distributed import process_group
    from moe_export.io import CheckpointError
    from moe_export.models import UnsupportedModelError
    from moe_export.plan.bitplan import BitPlanError
    from moe_export.size import safetensors_bytes
    from moe_export.streaming import StreamingError, quantize_checkpoint

    t0 = time.perf_counter()
    try:
        with process_group() as (rank, world, barrier):
            quantize_checkpoint(src, plan_path, output, quantizer, progress=not quiet and rank == 0, rank=rank,
                                world_size=world, barrier=barrier)
    except (StreamingError, BitPlanError, CheckpointError, UnsupportedModelError) as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f"{err.filename or output}: {err.strerror or err}") from None
    if rank == 0:
        n = len(list(Path(output).glob("model-*.safetensors")))
        click.echo(f"quantized {src} with {quantizer} (streaming, {world} process{'es' if world > 1 else ''}) -> "
                   f"{output}: {n} shards, {safetensors_bytes(output) / 1e6:.3f} MB in {time.perf_counter() - t0:.1f}s")
