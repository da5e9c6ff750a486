"""``moe-export quantize MODEL_DIR --plan plan.json [--quantizer rtn|hqq|gptq] [--calib-tokens N] -o QDIR``."""

from __future__ import annotations

import time
from pathlib import Path

import click


def _model_folder(path: Path) -> Path:
    # a zoo build folder holds pretrained/ and finetuned/: the fine-tuned model is the one to quantize
    if not (path / "config.json").is_file() and (path / "finetuned" / "config.json").is_file():
        return path / "finetuned"
    if not (path / "config.json").is_file():
        raise click.ClickException(f"{path}: no config.json; pass a transformers checkpoint folder or a zoo build folder")
    return path


def load_float_model(path: Path):
    import json

    import torch
    import transformers

    arch = (json.loads((path / "config.json").read_text()).get("architectures") or [None])[0]
    if arch is None or not hasattr(transformers, arch):
        raise click.ClickException(f"{path}/config.json: unknown architecture {arch!r}")
    return getattr(transformers, arch).from_pretrained(str(path), dtype=torch.float32).eval()


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

    from moe_export.api import MoEQuantConfig, expert_bytes, quantize_, theoretical_expert_bytes
    from moe_export.checkpoint import checkpoint_bytes, save_quantized, theoretical_model_bytes
    from moe_export.plan.bitplan import BitPlan, BitPlanError
    from moe_export.quant.base import available_quantizers

    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        plan = BitPlan.load(plan_path)
    except BitPlanError as err:
        raise click.ClickException(str(err)) from None
    name = quantizer or plan.quantizer.name
    if name not in available_quantizers():
        raise click.ClickException(f"unknown quantizer {name!r}; choose one of {available_quantizers()}")
    calibration = None
    if calib_tokens is not None:
        from moe_export.quant.calibration import CalibrationConfig

        calibration = CalibrationConfig(n_tokens=calib_tokens)
    src = _model_folder(model_dir)
    from moe_export.streaming import should_stream, stream_command

    if should_stream(src, name, streaming):
        return stream_command(src, plan_path, name, output, quiet)
    t0 = time.perf_counter()
    model = load_float_model(src)
    try:
        quantize_(model, MoEQuantConfig(plan, quantizer=name, calibration=calibration), progress=not quiet)
    except (BitPlanError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    save_quantized(model, output, plan=plan, source_dir=src)
    got, want = checkpoint_bytes(output), theoretical_model_bytes(model)
    click.echo(
        f"quantized {src} with {name} ({plan.mean_bits():.3f} mean expert bits) -> {output} in "
        f"{time.perf_counter() - t0:.1f}s\n"
        f"  experts in memory {expert_bytes(model) / 1e6:.3f} MB (theoretical {theoretical_expert_bytes(model, plan) / 1e6:.3f} MB); "
        f"file {got / 1e6:.3f} MB (theoretical {want / 1e6:.3f} MB, {100 * (got / want - 1):+.2f}%)"
    )
