"""Export a quantized model to every requested target, check each artifact, measure it: one call.

    from moe_export.export import export_artifacts
    report = export_artifacts(qmodel, "out/", targets=("pte", "onnx"), pte_modes=("native", "packed"),
                              float_model=fmodel)
    report["artifacts"]  # one row per file: size vs theoretical, parity, decode latency

``moe-export export`` and the demo call this.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moe_export.io import atomic_write_json
from moe_export.table import format_table

TARGETS = ("pte", "onnx")


def _artifact_name(target: str, mode: str | None) -> str:
    if target == "onnx":
        return "model.onnx" if mode in (None, "packed") else f"model-{mode}.onnx"
    return f"model-{mode}.pte"


def seq2seq_modes(target: str, modes) -> list[tuple[str, str | None]]:
    """``(mode, note)`` per requested mode of an encoder-decoder (SwitchTransformers) model: a mode without a form for
    its top-1 blocks of ungated experts runs as the best one that has one (.pte: ``xnnpack``, packed experts with the
    float parts on XNNPACK; .onnx: ``packed``, gathered packed experts), and the note says so. Duplicates drop."""
    from moe_export.export.executorch import SEQ2SEQ_PTE_MODES

    have, best = (SEQ2SEQ_PTE_MODES, "xnnpack") if target == "pte" else (("packed",), "packed")
    out: dict[str, str | None] = {}
    for m in modes:
        if m in have:
            out[m] = None  # asked for by name: no note, even where another mode was routed to it
        elif best not in out:
            kernels = "the native kernel computes SwiGLU experts" if target == "pte" else \
                "QMoE and MatMulNBits nodes are built for fused gated experts"
            out[best] = (f"{target} mode {m!r} has no form for encoder-decoder top-1 experts ({kernels}): "
                         f"exported as {best!r}")
    return list(out.items())


def _approximate(target: str, mode: str | None, accuracy_level: int, metadata: dict | None = None,
                 accuracy: str | None = None) -> bool:
    """Modes whose kernels quantize activations to int8: parity is an SQNR floor, not a tight max error.
    ``accuracy``: the arithmetic a native .pte was exported with (``export.executorch.native_accuracy``)."""
    if target == "onnx" and mode == "native":
        # QMoE / MatMulNBits: 2-bit (LUT) and 8-bit block-wise containers compute with int8 activations on
        # onnxruntime's CPU EP at every accuracy level; 4-bit is fp32 at level 0
        from moe_export.export.qmoe import APPROXIMATE_CONTAINERS

        meta = metadata or {}
        used = [c for key in ("moe_export.containers", "moe_export.linear_containers")
                for c in json.loads(meta.get(key, "{}")).values()]
        return accuracy_level != 0 or any(c in APPROXIMATE_CONTAINERS for c in used)
    return ((target == "pte" and (mode == "xnnpack-int" or accuracy == "int8"))
            or (target == "onnx" and mode == "fast" and accuracy_level != 0))


def export_artifacts(
    qmodel: torch.nn.Module,
    out_dir: str | os.PathLike,
    targets=TARGETS,
    pte_modes=("native",),
    onnx_modes=("packed",),
    accuracy_level: int = 4,
    float_model: torch.nn.Module | None = None,
    max_seq_len: int = 128,
    check: bool = True,
    latency: bool = True,
    float_baseline: bool = True,
    prompt: torch.Tensor | None = None,
    new_tokens: int = 32,
    seed: int = 0,
    progress: bool = True,
    source: str | os.PathLike | None = None,
) -> dict:
    """Write the artifacts into ``out_dir`` and return (and save as ``export_report.json``) their report.

    ``check``: parity vs the eager quantized model (raises :class:`ParityError` on a mismatch, after the
    report is written). ``float_baseline``: also export ``float_model`` to each target so decode latency
    is compared in the same run. ``onnx_modes``: ``packed`` (smallest) and/or ``fast`` (MatMulNBits experts at
    MatMulNBits ``accuracy_level``); ``pte_modes``: ``native`` (the moe_export kernels at the inference default
    arithmetic, int8 activations unless pinned exact; the row's ``accuracy`` says which), ``native-exact``,
    ``native-int8``, ``packed``, ``xnnpack``, ``xnnpack-int``. Modes with int8
    activation arithmetic are checked against an SQNR floor (``parity.APPROX_MIN_SQNR_DB``). ``prompt``: token ids for the parity checks (default: random ids).
    A bfloat16/float16 ``qmodel`` is exported computing in float32 (``export.prepare.to_float32_``), and its parity is
    checked against the same model computing in float32; the report's ``dtype`` says so.
    ``source``: the quantized folder ``qmodel`` was loaded from; its
    tokenizer files are copied beside the artifacts and the report names it, so `moe-export eval ARTIFACT` can
    score text.
    """
    from moe_export.export.executorch import PTE_MODES, export_pte, native_accuracy, pte_ops
    from moe_export.export.onnx import ONNX_MODES, export_onnx, onnx_initializer_types, onnx_metadata, onnx_ops
    from moe_export.eval import logits_fn_for
    from moe_export.export.parity import APPROX_MIN_SQNR_DB, ParityError, check_parity, compare
    from moe_export.export.prepare import float32_copy, prepare_for_export, theoretical_size
    from moe_export.export.runners import decode_latency_ms, open_runner
    from moe_export.export.seq2seq import Seq2SeqStep, encoder_path, is_seq2seq
    from moe_export.export.wrapper import DecoderStep

    targets = tuple(targets)
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"unknown export target {t!r}; choose from {', '.join(TARGETS)}")
    for m in pte_modes:
        if m not in PTE_MODES:
            raise ValueError(f"unknown pte mode {m!r}; choose from {', '.join(PTE_MODES)}")
    for m in onnx_modes:
        if m not in ONNX_MODES:
            raise ValueError(f"unknown onnx mode {m!r}; choose from {', '.join(ONNX_MODES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source_dtype = qmodel.dtype
    # the artifacts compute in float32 (export.prepare.HALF_DTYPES): their parity is checked against the same
    # quantized model computing in float32, so a bfloat16 checkpoint keeps the tight tolerance
    qmodel = float32_copy(qmodel)
    prepared = prepare_for_export(qmodel)
    theory = theoretical_size(prepared)
    # an encoder-decoder: an encoder program and a decoder step with cross-attention inputs (export.seq2seq)
    seq2seq = is_seq2seq(prepared)
    make_step = Seq2SeqStep if seq2seq else DecoderStep
    step = make_step(prepared, max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    vocab = step.vocab_size
    if prompt is None:
        prompt = torch.randint(0, vocab, (8,), generator=gen)
    prompt = prompt.reshape(-1)
    if prompt.numel() + new_tokens > max_seq_len:
        raise ValueError(f"prompt of {prompt.numel()} + {new_tokens} new tokens exceed max_seq_len={max_seq_len}")
    check_ids = torch.randint(0, vocab, (1, min(24, max_seq_len)), generator=gen)
    eager_fn = logits_fn_for(qmodel)
    float_fn = logits_fn_for(float_model) if float_model is not None else None

    if seq2seq:
        jobs = [(t, m, note) for t in targets for m, note in seq2seq_modes(t, pte_modes if t == "pte" else onnx_modes)]
    else:
        jobs = [(t, m, None) for t in targets for m in (pte_modes if t == "pte" else onnx_modes)]
    if float_model is not None and float_baseline:
        jobs += [(f"{t}-float", "xnnpack" if t == "pte" else None, None) for t in targets]
    rows, failures = [], []
    bar = tqdm(jobs, desc="export", disable=not progress)
    for target, mode, note in bar:
        is_float = target.endswith("-float")
        base = target.removesuffix("-float")
        bar.set_postfix_str(f"{target} {mode or ''}".strip())
        name = _artifact_name(base, None if is_float and base == "onnx" else mode)
        if is_float:
            name = name.replace("model", "float", 1)
        path = out_dir / name
        src = make_step(prepare_for_export(float_model), max_seq_len) if is_float else step
        t0 = time.perf_counter()
        accuracy = native_accuracy(mode) if base == "pte" and not is_float else None
        if base == "pte":
            export_pte(src, path, mode=mode)
            ops = pte_ops(path)
        else:
            export_onnx(src, path, mode="packed" if is_float else mode, accuracy_level=accuracy_level)
            ops = onnx_ops(path)
        row = {
            "target": target, "mode": mode, "path": str(path), "export_s": round(time.perf_counter() - t0, 1),
            "bytes": path.stat().st_size, "ops": ops,
        }
        if accuracy is not None:  # the arithmetic baked into a native .pte's kernels
            row["accuracy"] = accuracy
        if note:
            row["note"] = note
        if seq2seq and base == "onnx":  # the encoder model beside the decoder step: one artifact, two files
            enc = encoder_path(path)
            row["files"] = [str(path), str(enc)]
            row["bytes"] += enc.stat().st_size
            row["encoder_ops"] = onnx_ops(enc)
        if base == "onnx":
            row["initializer_bytes"] = onnx_initializer_types(path)
            row["metadata"] = onnx_metadata(path)
        if not is_float:
            row["theoretical_bytes"] = theory["total"]
            row["size_vs_theoretical"] = row["bytes"] / theory["total"]
        runner = open_runner(path)
        if check and not is_float:
            rep = compare(runner, eager_fn, check_ids, float_fn, gen_model=qmodel, gen_prompt=prompt, new_tokens=new_tokens)
            row["parity"] = rep.to_dict()
            try:
                approx = _approximate(base, mode, accuracy_level, row.get("metadata"), accuracy)
                row["parity_rule"] = f"SQNR vs eager >= {APPROX_MIN_SQNR_DB} dB" if approx else "max abs err, 1e-4 relative"
                check_parity(rep, min_sqnr_db=APPROX_MIN_SQNR_DB if approx else None)
                row["parity_ok"] = True
            except ParityError as err:
                row["parity_ok"] = False
                failures.append(str(err))
        if latency:
            row["decode_ms"] = round(decode_latency_ms(runner), 3)
        rows.append(row)
    report = {"theoretical": theory, "max_seq_len": max_seq_len, "artifacts": rows}
    if source_dtype != torch.float32:
        report["dtype"] = {"checkpoint": str(source_dtype).removeprefix("torch."), "artifacts": "float32"}
    if source is not None:
        from moe_export.checkpoint import copy_tokenizer

        report["source"] = str(source)
        copy_tokenizer(source, out_dir)
    atomic_write_json(out_dir / "export_report.json", report)
    if failures:
        raise ParityError("; ".join(failures) + f" (report: {out_dir / 'export_report.json'})")
    return report


def format_report(report: dict) -> str:
    """A terminal table of an :func:`export_artifacts` report."""
    head = ("artifact", "MB", "vs theory", "max|err| vs eager", "SQNR vs eager", "SQNR vs float", "greedy match",
            "decode ms")
    rows = []
    for r in report["artifacts"]:
        p = r.get("parity") or {}
        sq, se = p.get("sqnr_vs_float_db"), p.get("sqnr_vs_eager_db")
        rows.append((
            Path(r["path"]).name,
            f"{r['bytes'] / 1e6:.3f}",
            f"{r['size_vs_theoretical']:.3f}" if "size_vs_theoretical" in r else "-",
            f"{p['max_abs_err_vs_eager']:.2e}" if p else "-",
            "-" if se is None else ("exact" if se == float("inf") else f"{se:.1f} dB"),
            f"{sq:.1f} dB" if sq is not None else "-",
            f"{p['greedy_match']}/{p['greedy_len']}" if p.get("greedy_len") else "-",
            f"{r['decode_ms']:.2f}" if "decode_ms" in r else "-",
        ))
    lines = format_table(head, rows, "lrrrrrrr")
    lines.append(f"theoretical size (docs/architecture.md): {report['theoretical']['total'] / 1e6:.3f} MB "
                 f"({report['theoretical']['packed'] / 1e6:.3f} MB packed experts)")
    for r in report["artifacts"]:
        if "files" in r:
            lines.append(f"{Path(r['path']).name}: encoder-decoder, {' + '.join(Path(f).name for f in r['files'])}")
        if "note" in r:
            lines.append(f"{Path(r['path']).name}: {r['note']}")
    return "\n".join(lines)
