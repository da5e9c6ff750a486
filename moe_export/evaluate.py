"""Open what ``moe-export eval`` is given and score exactly that with ``moe_export.eval``.

A target is a zoo build folder or zoo entry name, a float checkpoint folder, a quantized folder (loaded through
``moe_export.hf``, the same path as ``from_pretrained``), or an exported ``.pte`` / ``.onnx`` decoder step (run by
its runtime, within the KV-cache length it was exported with). Every kind yields the same ``logits_fn`` and the
same metrics, so the numbers of a float model, its quantized folder and its artifacts compare directly.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from moe_export.eval import LogitsFn, evaluate, logits_fn_for
from moe_export.io import CheckpointError

ARTIFACT_SUFFIXES = (".pte", ".onnx")
DEFAULT_CORPORA = ("python-stdlib", "shakespeare")
REPORT_NAME = "export_report.json"


@dataclass
class Target:
    kind: str  # "float" | "quantized" | "pte" | "onnx"
    path: Path
    logits_fn: LogitsFn
    tokenizer: object
    max_seq_len: int | None = None  # an artifact's KV-cache length: no window may be longer
    trained_seq_len: int | None = None  # the context the model was trained at (zoo manifest or config)
    corpora: tuple[str, ...] = DEFAULT_CORPORA
    model: object = field(default=None, repr=False)


def _defaults(folder: Path, config_seq_len: int | None) -> tuple[tuple[str, ...], int | None]:
    """Corpora and training context length from a zoo manifest beside ``folder``, else the config's."""
    from moe_export.zoo.folders import find_manifest

    entry = find_manifest(folder).get("entry", {})
    corpora = tuple(sorted({entry["pretrain"]["corpus"], entry["finetune"]["corpus"]})) if "pretrain" in entry \
        else DEFAULT_CORPORA
    return corpora, entry.get("seq_len") or config_seq_len


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: no tokenizer to score text with ({str(err).splitlines()[0]})") from None


def _config_seq_len(folder: Path) -> int | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None


def open_target(path_or_name: str | os.PathLike, which: str = "finetuned", threads: int = 1) -> Target:
    """Load ``path_or_name`` for scoring; one clear ``CheckpointError`` when it cannot be."""
    p = Path(path_or_name)
    if p.suffix in ARTIFACT_SUFFIXES:
        return _open_artifact(p, threads)
    from moe_export.hf import is_quantized_folder, load_pretrained
    from moe_export.zoo.folders import resolve

    try:
        folder = resolve(path_or_name, which).checkpoint
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None
    if is_quantized_folder(folder):
        from moe_export.hf import load_quantized

        model, kind = load_quantized(folder), "quantized"
    else:
        model, kind = load_pretrained(folder, experts_implementation="grouped_mm"), "float"
    corpora, seq = _defaults(folder, getattr(model.config, "max_position_embeddings", None))
    return Target(kind, folder, logits_fn_for(model), _tokenizer(folder), None, seq, corpora, model)


def _open_artifact(path: Path, threads: int) -> Target:
    from moe_export.export.runners import OnnxRunner, PteRunner, logits_fn

    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a .pte or .onnx written by `moe-export export`")
    try:
        runner = PteRunner(path, threads=threads) if path.suffix == ".pte" else OnnxRunner(path, threads=threads)
    except Exception as err:  # noqa: BLE001 - each runtime raises its own error types
        raise CheckpointError(f"{path}: the runtime cannot load it ({str(err).splitlines()[0]})") from None
    # the tokenizer travels with the artifacts; the export report names the checkpoint they came from
    report = path.parent / REPORT_NAME
    source = None
    if report.is_file():
        src = json.loads(report.read_text()).get("source")
        source = Path(src) if src else None
    tok_dir = path.parent if (path.parent / "tokenizer.json").is_file() else source
    if tok_dir is None:
        raise CheckpointError(f"{path}: no tokenizer.json beside it and no source in {REPORT_NAME}; copy the "
                              "tokenizer files of the quantized folder next to the artifact")
    cfg_dir = source if source is not None and (source / "config.json").is_file() else tok_dir
    corpora, seq = _defaults(cfg_dir, _config_seq_len(cfg_dir))
    kind = path.suffix.lstrip(".")
    return Target(kind, path, logits_fn(runner), _tokenizer(tok_dir), runner.max_seq_len, seq, corpora)


def evaluate_target(target: Target, corpora: list[str] | None = None, seq_len: int | None = None,
                    max_tokens: int | None = 16384, n_cloze: int = 200, batch_size: int = 8,
                    progress: bool = True, accuracy: str = "exact") -> dict:
    """Bits per byte and cloze accuracy of ``target`` on each corpus' held-out split."""
    seq = seq_len or target.trained_seq_len or target.max_seq_len or 128
    if target.max_seq_len is not None:
        if seq_len is not None and seq_len > target.max_seq_len:
            raise ValueError(f"{target.path}: --seq-len {seq_len} exceeds the KV cache of {target.max_seq_len} it "
                             "was exported with")
        seq = min(seq, target.max_seq_len)
    res = evaluate(target.logits_fn, target.tokenizer, list(corpora or target.corpora), seq, max_tokens, n_cloze,
                   batch_size, progress, accuracy)
    return {"checkpoint": str(target.path), "kind": target.kind, "seq_len": seq, "accuracy": accuracy, "results": res}


def compare(res: dict, ref: dict) -> dict:
    """Per corpus, the difference ``res - ref`` of bpb and cloze accuracy (both scored on the same text)."""
    out = {}
    for corpus, r in res["results"].items():
        f = ref["results"].get(corpus)
        if f is None:
            continue
        d = {"bpb": r["bpb"]["bits_per_byte"] - f["bpb"]["bits_per_byte"]}
        d["bpb_rel"] = d["bpb"] / f["bpb"]["bits_per_byte"]
        if "cloze" in r and "cloze" in f:
            d["cloze"] = r["cloze"]["accuracy"] - f["cloze"]["accuracy"]
        out[corpus] = d
    return out


def format_table(res: dict, against: dict | None = None) -> str:
    """A terminal table: one row per corpus and metric; with ``against``, the reference beside it and the change."""
    head = ["corpus", "metric", res["kind"]]
    if against is not None:
        head += [against["kind"] + " (against)", "change"]
    rows = []
    diffs = compare(res, against) if against is not None else {}
    for corpus, r in res["results"].items():
        metrics = [("bits/byte", r["bpb"]["bits_per_byte"], "bpb")]
        if "cloze" in r:
            metrics.append(("cloze acc", r["cloze"]["accuracy"], "cloze"))
        for label, value, key in metrics:
            row = [corpus, label, f"{value:.4f}"]
            if against is not None:
                ref = against["results"].get(corpus, {})
                ref_v = ref.get("bpb", {}).get("bits_per_byte") if key == "bpb" else ref.get("cloze", {}).get("accuracy")
                d = diffs.get(corpus, {})
                row.append("-" if ref_v is None else f"{ref_v:.4f}")
                if key not in d:
                    row.append("-")
                elif key == "bpb":
                    row.append(f"{d['bpb']:+.4f} ({100 * d['bpb_rel']:+.2f}%)")
                else:
                    row.append(f"{d['cloze']:+.4f}")
            rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(head), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [fmt(r) for r in rows]
    first = next(iter(res["results"].values()))
    lines.append(f"{res['checkpoint']} ({res['kind']}), windows of {res['seq_len']} tokens, "
                 f"{first['bpb']['tokens_scored']} tokens scored per corpus"
                 + (f", {first['cloze']['n']} cloze items" if "cloze" in first else ""))
    return "\n".join(lines)
