"""The whole pipeline of a recipe: model -> plan -> quantize -> compile -> export -> parity -> one table.

``moe-export run RECIPE`` and ``moe-export demo`` (= ``run tiny-demo``) call :func:`run_recipe`.
Every step writes its artifact into the work folder, so the printed table says where each one is.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch

from moe_export.io import atomic_write_json
from moe_export.recipes import Recipe, RecipeError, check_runnable, run_reference, validate_recipe
from moe_export.table import format_table


def _model_root(recipe: Recipe, seed: int, echo, model_dir: str | Path | None = None) -> Path:
    model = recipe.model
    if model_dir is not None:  # `moe-export run RECIPE --model DIR`: a local copy of the recipe's model
        root = Path(model_dir).expanduser()
        if not root.exists():
            raise RecipeError(f"--model {root} does not exist")
        echo(f"[1/6] local model {root}")
        return root
    if "zoo" in model:
        from moe_export.zoo import build

        echo(f"[1/6] zoo model {model['zoo']!r} (built once, then reused from the cache)")
        return Path(build(model["zoo"], seed=seed))
    if "path" in model:
        root = Path(model["path"]).expanduser()
        if not root.exists():
            raise RecipeError(f"{recipe.source}: model.path {root} does not exist")
        echo(f"[1/6] local model {root}")
        return root
    raise RecipeError(
        f"{recipe.source}: model {model['id']!r} is a hub id and nothing is downloaded at run time; "
        "download it yourself and pass the local folder with --model DIR (or set model.path)"
    )


def run_recipe(recipe: Recipe | str | Path, work_dir: str | Path | None = None, seed: int = 0,
               progress: bool = True, echo=print, model_dir: str | Path | None = None,
               memory_budget: int | None = None) -> dict:
    """Run ``recipe`` end to end into ``work_dir`` (default ``runs/<recipe name>``) and return its summary.

    ``model_dir``: a local folder holding the recipe's model (instead of its ``model.path`` / zoo entry).
    ``memory_budget``: bytes the run may hold (default: the available memory); a checkpoint over half of it is
    planned, quantized and written one layer at a time (``moe_export.streaming``), and the rest of the run works
    on the packed model, without a float copy. Every recipe field the run cannot honour (a calibrated plan or GPTQ
    on a streamed model, a reference that is not a local folder, ...) is an error before any weight is read."""
    from moe_export.export.parity import ParityError

    recipe = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
    work = Path(work_dir or Path("runs") / recipe.name)
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run_in(recipe, work, seed, progress, echo, model_dir, memory_budget)
    except ParityError:
        raise  # the artifacts and export_report.json in the work folder show what differs
    except BaseException:
        if created:  # a run that stopped on bad input leaves nothing behind
            shutil.rmtree(work, ignore_errors=True)
        raise


def _run_in(recipe: Recipe, work: Path, seed: int, progress: bool, echo, model_dir, memory_budget) -> dict:
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.checkpoint import save_quantized
    from moe_export.eval import evaluate, logits_fn_for
    from moe_export.export.parity import max_abs_err, sqnr
    from moe_export.export.pipeline import export_artifacts, format_report
    from moe_export.export.runners import HFCacheRunner, decode_latency_ms
    from moe_export.hf import load_quantized
    from moe_export.loading import load_float_model
    from moe_export.plan.methods import CALIBRATED, PlanConfig, make_plan
    from moe_export.size import safetensors_bytes, theoretical_model_bytes
    from moe_export.streaming import fits_in_memory, quantize_checkpoint
    from moe_export.zoo.folders import resolve

    t_start = time.perf_counter()
    if "architecture" in recipe.model:
        # a recipe for a real checkpoint is checked on the meta device (layer names, group sizes, reachable
        # averages) before any weight is read
        validate_recipe(recipe)
    root = _model_root(recipe, seed, echo, model_dir)
    try:
        folder = resolve(root, build=False)
    except FileNotFoundError as err:
        raise RecipeError(f"{recipe.source}: {err}") from None
    final_dir, reference = folder.checkpoint, folder.reference
    reference = run_reference(recipe, reference)
    method = recipe.plan.get("method", "router+maxvar")
    streamed = not fits_in_memory(final_dir, memory_budget)
    check_runnable(recipe, final_dir, streamed, memory_budget)

    echo(f"[2/6] plan: {method} at {recipe.avg_bits} bits, levels {recipe.levels}"
         + (f", reference {reference}" if reference else ""))
    cfg = PlanConfig(
        avg_bits=recipe.avg_bits, levels=recipe.levels, method=method,
        zeta=float(recipe.plan.get("zeta", 3.0)), group_size=recipe.group_size,
        symmetric=bool(recipe.quantizer.get("symmetric", False)), quantizer=recipe.quantizer["name"],
        non_expert=recipe.non_expert,
    )
    float_model = None
    if method in CALIBRATED:  # routing statistics need the model in memory and text (check_runnable saw to both)
        from moe_export.api import calibration_batches_for
        from moe_export.quant.calibration import CalibrationConfig

        float_model = load_float_model(final_dir)
        windows = calibration_batches_for(float_model, CalibrationConfig(n_tokens=int(recipe.plan.get("calib_tokens",
                                                                                                      8192)), seed=seed))
        plan = make_plan(float_model, cfg, batches=list(torch.split(windows, 8)), model_name=final_dir.name,
                         progress=progress)
    else:
        plan = make_plan(final_dir, cfg, reference=reference, progress=progress)
    plan_path = work / "plan.json"
    plan.save(plan_path)
    echo(plan.summary())

    qdir = work / "quantized"
    if streamed:
        echo(f"[3/6] quantize with {recipe.quantizer['name']}, streaming: the checkpoint "
             f"({safetensors_bytes(final_dir) / 2**30:.2f} GiB) is over half the memory budget")
        quantize_checkpoint(final_dir, plan, qdir, recipe.quantizer["name"], progress=progress)
        qmodel = load_quantized(qdir)
        float_bytes = safetensors_bytes(final_dir)
    else:
        echo(f"[3/6] quantize with {recipe.quantizer['name']}")
        float_model = float_model if float_model is not None else load_float_model(final_dir)
        qmodel = copy.deepcopy(float_model)
        calibration = None
        if recipe.quantizer["name"] == "gptq":
            from moe_export.quant.calibration import CalibrationConfig

            calibration = CalibrationConfig(n_tokens=int(recipe.quantizer.get("calib_tokens", 8192)))
        quantize_(qmodel, MoEQuantConfig(plan, quantizer=recipe.quantizer["name"], calibration=calibration),
                  progress=progress)
        save_quantized(qmodel, qdir, plan=plan, source_dir=final_dir)
        float_bytes = sum(p.numel() * p.element_size() for p in float_model.parameters())

    echo("[4/6] quality (held-out bits per byte) and torch.compile")
    seq_len = folder.entry.get("seq_len", 64)
    corpus = folder.entry.get("finetune", {}).get("corpus")
    quality = {}
    # a streamed run has no float copy in memory: its rows compare against nothing float
    models = (("float", float_model), ("quantized", qmodel)) if float_model is not None else (("quantized", qmodel),)
    if corpus:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(final_dir))
        for label, m in models:
            quality[label] = evaluate(logits_fn_for(m), tok, [corpus], seq_len, max_tokens=4096, n_cloze=50,
                                      progress=progress)[corpus]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, qmodel.config.vocab_size, (1, 16), generator=gen)
    compiled = torch.compile(qmodel, fullgraph=True)
    with torch.no_grad():
        eager_logits = qmodel(input_ids=ids, use_cache=False).logits
        compiled_logits = compiled(input_ids=ids, use_cache=False).logits
        float_logits = None if float_model is None else float_model(input_ids=ids, use_cache=False).logits
    compile_row = {
        "max_abs_err_vs_eager": max_abs_err(eager_logits, compiled_logits),
        "sqnr_vs_float_db": None if float_logits is None else sqnr(float_logits, compiled_logits),
    }
    latency = {  # one decode step through the model's own KV cache, as generate() runs it
        f"{label} eager": decode_latency_ms(HFCacheRunner(m), prompt_len=ids.shape[1], steps=10, warmup=2)
        for label, m in models
    }

    echo(f"[5/6] export to {', '.join(recipe.targets) or 'nothing'} with parity checks")
    export_report = None
    if recipe.targets:
        pte_modes = tuple(recipe.export.get("pte_modes", ["packed"]))
        export_report = export_artifacts(qmodel, work / "export", targets=recipe.targets, pte_modes=pte_modes,
                                         onnx_modes=tuple(recipe.export.get("onnx_modes", ["packed"])),
                                         float_model=float_model, progress=progress)
        echo(format_report(export_report))

    summary = {
        "recipe": recipe.name,
        "work_dir": str(work),
        "model": str(final_dir),
        "reference": str(reference) if reference else None,
        "plan": {"path": str(plan_path), "mean_bits": plan.mean_bits(), "levels": plan.levels},
        **({"streamed": True} if streamed else {}),
        "quantized": {"path": str(qdir), "bytes": safetensors_bytes(qdir), "theoretical_bytes": theoretical_model_bytes(qmodel),
                      "float_bytes": float_bytes},
        "quality": quality,
        "compile": compile_row,
        "latency_ms": latency,
        "export": export_report,
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_json(work / "summary.json", summary)
    echo("[6/6] summary")
    echo(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    """One table: bits, size vs float, parity, decode latency per runtime, and where each artifact is."""
    q = s["quantized"]
    rows = [("float (eager)", "32", q["float_bytes"], "-", "-", s["latency_ms"].get("float eager"), s["model"])]
    quality = s.get("quality") or {}
    bits = f"{s['plan']['mean_bits']:.3f}"
    rows.append(("quantized (eager)", bits, q["bytes"], "reference", "-", s["latency_ms"].get("quantized eager"), q["path"]))
    c = s["compile"]
    rows.append(("quantized (torch.compile)", bits, q["bytes"], f"{c['max_abs_err_vs_eager']:.1e}",
                 "-" if c["sqnr_vs_float_db"] is None else f"{c['sqnr_vs_float_db']:.1f}", None, "(in memory)"))
    for a in (s.get("export") or {}).get("artifacts", []):
        p = a.get("parity") or {}
        float_art = a["target"].endswith("-float")
        rows.append((
            f"{a['target'].removesuffix('-float')} {a.get('mode') or ''}".strip() + (" float" if float_art else ""),
            "32" if float_art else bits,
            a["bytes"],
            f"{p['max_abs_err_vs_eager']:.1e}" if p else "-",
            f"{p['sqnr_vs_float_db']:.1f}" if p.get("sqnr_vs_float_db") is not None else "-",
            a.get("decode_ms"),
            a["path"],
        ))
    out = format_table(("runtime", "bits", "MB", "vs float", "max|err| vs eager", "SQNR dB", "decode ms", "artifact"),
                       [(name, b, f"{nbytes / 1e6:.3f}", f"{nbytes / q['float_bytes']:.3f}", err, sq,
                         f"{ms:.2f}" if isinstance(ms, (int, float)) else "-", path)
                        for name, b, nbytes, err, sq, ms, path in rows], "lrrrrrrl")
    if quality and "float" not in quality:  # streamed: no float copy was held
        qq = quality["quantized"]
        out.append(f"held-out bits per byte: quantized {qq['bpb']['bits_per_byte']:.3f}; cloze accuracy "
                   f"({qq['cloze']['n']} items, chance {qq['cloze']['chance']:.2f}): {qq['cloze']['accuracy']:.3f}")
    elif quality:
        f, qq = quality["float"], quality["quantized"]
        out.append(f"held-out bits per byte: float {f['bpb']['bits_per_byte']:.3f}, quantized {qq['bpb']['bits_per_byte']:.3f}; "
                   f"cloze accuracy ({f['cloze']['n']} items, chance {f['cloze']['chance']:.2f}): "
                   f"float {f['cloze']['accuracy']:.3f}, quantized {qq['cloze']['accuracy']:.3f}")
    out.append(f"theoretical size of the quantized checkpoint: {q['theoretical_bytes'] / 1e6:.3f} MB; "
               f"work folder: {s['work_dir']} (summary.json); {s['wall_s']} s in all")
    return "\n".join(out)
