"""``moe-export export QDIR --to pte,onnx -o OUTDIR [--pte-mode native,native-exact,packed,xnnpack,xnnpack-int] [--onnx-mode native,packed,fast]
[--onnx-accuracy fast|exact] [--float MODEL_DIR]``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(name="export", help="Export the quantized checkpoint QDIR to ExecuTorch (.pte) and/or ONNX, check "
               "parity against the eager quantized model and measure decode latency.")
@click.argument("qdir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--to", "targets", default="pte,onnx", show_default=True, help="Comma-separated targets: pte, onnx.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True, help="Folder for the artifacts.")
@click.option("--pte-mode", "pte_modes", default="native", show_default=True,
              help="Comma-separated: native (moe_export's ExecuTorch kernels read every packed weight at its width, "
                   "routed experts only, float parts on XNNPACK: small and fast; the kernel library is built on "
                   "first use and the runners load it; its kernels run the inference default arithmetic, int8 "
                   "activations, ~40 dB vs eager, unless MOE_EXPORT_ACCURACY=exact), native-exact / native-int8 "
                   "(the same kernels with fp32 / int8 activations pinned), "
                   "packed (portable kernels, every expert at its width), xnnpack "
                   "(same packed experts, XNNPACK delegate for the float ops) and/or xnnpack-int (int4-exact experts "
                   "on XNNPACK's int8-activation int4 kernel: fast, larger file, ~40-50 dB vs eager).")
@click.option("--onnx-mode", "onnx_modes", default="native", show_default=True,
              help="Comma-separated: native (onnxruntime's quantized ops: one com.microsoft::QMoE node per expert "
                   "width group, only routed experts run; MatMulNBits linears; GatherBlockQuantized embeddings; 1/3/5-7 "
                   "bits stored as 2/4/8; integer zero points only), packed (gathered packed experts, exact at every "
                   "width, any zero points: smallest) and/or fast (every expert projection a com.microsoft::MatMulNBits "
                   "under an If).")
@click.option("--onnx-accuracy", type=click.Choice(["fast", "exact"]), default="fast", show_default=True,
              help="Arithmetic of the native and fast .onnx: fast = int8 activations (accuracy_level 4; ~40 dB vs eager, "
                   "10-20x faster 4-bit experts on AMD Zen 4), exact = float activations (accuracy_level 0: float "
                   "rounding for 4-bit containers; 2- and 8-bit containers stay int8 in onnxruntime).")
@click.option("--float", "float_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The float model the checkpoint was quantized from: adds SQNR vs float and float artifacts for latency.")
@click.option("--max-seq-len", type=int, default=128, show_default=True, help="KV cache length baked into the artifacts.")
@click.option("--no-check", is_flag=True, help="Skip the parity checks.")
@click.option("--no-latency", is_flag=True, help="Skip the decode latency measurement.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def command(qdir: Path, targets: str, output: Path, pte_modes: str, onnx_modes: str, onnx_accuracy: str, float_dir,
            max_seq_len: int, no_check: bool, no_latency: bool, quiet: bool):
    import torch

    from moe_export.hf import load_quantized
    from moe_export.export.executorch import PTE_MODES
    from moe_export.export.onnx import ACCURACY_LEVELS, ONNX_MODES
    from moe_export.export.parity import ParityError
    from moe_export.export.pipeline import TARGETS, export_artifacts, format_report
    from moe_export.io import CheckpointError

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tlist = [t.strip() for t in targets.split(",") if t.strip()]
    mlist = [m.strip() for m in pte_modes.split(",") if m.strip()]
    olist = [m.strip() for m in onnx_modes.split(",") if m.strip()]
    bad = [t for t in tlist if t not in TARGETS] + [m for m in mlist if m not in PTE_MODES]
    bad += [m for m in olist if m not in ONNX_MODES]
    if bad or not tlist or not mlist or not olist:
        raise click.ClickException(f"unknown or empty target/mode {bad}; --to takes {', '.join(TARGETS)}, "
                                   f"--pte-mode takes {', '.join(PTE_MODES)}, --onnx-mode takes {', '.join(ONNX_MODES)}")
    from moe_export.io import OutputFolderError, check_output_folder, output_lock

    try:  # before any work: artifacts go neither into an input folder nor among other files
        check_output_folder(output, sources=[qdir] + ([float_dir] if float_dir is not None else []),
                            ours=lambda d: (d / "export_report.json").is_file(), partial=("*.pte", "*.onnx", ".*.tmp"))
        qmodel = load_quantized(qdir)
    except (CheckpointError, OutputFolderError) as err:
        raise click.ClickException(str(err)) from None
    fmodel = None
    if float_dir is not None:
        from moe_export.loading import load_float_model, model_folder

        try:
            fmodel = load_float_model(model_folder(float_dir))
        except CheckpointError as err:
            raise click.ClickException(str(err)) from None
    try:
        with output_lock(output):
            report = export_artifacts(qmodel, output, targets=tlist, pte_modes=mlist, onnx_modes=olist,
                                      accuracy_level=ACCURACY_LEVELS[onnx_accuracy], float_model=fmodel,
                                      max_seq_len=max_seq_len, check=not no_check, latency=not no_latency,
                                      progress=not quiet, source=qdir)
    except ParityError as err:
        raise click.ClickException(f"parity check failed: {err}") from None
    except OutputFolderError as err:
        raise click.ClickException(str(err)) from None
    except ValueError as err:  # a mode that cannot hold these weights (e.g. QMoE and fractional zero points)
        raise click.ClickException(str(err)) from None
    click.echo(format_report(report))
    click.echo(f"artifacts and export_report.json in {output}")
