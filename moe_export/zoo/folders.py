"""Where a model lives: the one resolver for every command and library call that takes a MODEL argument.

MODEL is a plain checkpoint folder (``config.json`` + weights), a zoo build folder (``initial/``, ``pretrained/``,
``finetuned/`` and ``manifest.json``), or a zoo entry name (built once into the cache, then reused). A zoo build
plans, quantizes and evaluates ``finetuned/`` and measures the router-norm change against ``pretrained/``; its
manifest gives the corpora and context length it was trained at.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
CHECKPOINTS = ("finetuned", "pretrained", "initial")


class FolderError(FileNotFoundError):
    """MODEL names no checkpoint folder, zoo build or zoo entry."""


@dataclass(frozen=True)
class ModelFolder:
    checkpoint: Path  # the folder that holds config.json: what is loaded
    reference: Path | None = None  # the checkpoint before fine-tuning (a zoo build's pretrained/), if there is one
    manifest: dict = field(default_factory=dict)  # the zoo build's manifest, {} for any other folder

    @property
    def entry(self) -> dict:
        """The zoo recipe the build was made from ({} outside the zoo): corpora, seq_len, model shape."""
        return self.manifest.get("entry", {})


def find_manifest(checkpoint: str | os.PathLike | None) -> dict:
    """The manifest of the zoo build a checkpoint folder belongs to (the folder itself or its parent), or {}."""
    if not checkpoint:
        return {}
    p = Path(checkpoint)
    for m in (p / MANIFEST, p.parent / MANIFEST):
        if m.is_file():
            return json.loads(m.read_text())
    return {}


def resolve(model: str | os.PathLike, which: str | None = "finetuned", seed: int = 0, build: bool = True) -> ModelFolder:
    """The checkpoint ``model`` names (``which`` of a zoo build; None: ``model`` itself), with its reference and
    manifest. A zoo entry name that is not a folder is built (once, then cached) when ``build`` is true.
    """
    p = Path(model)
    if not p.exists() and build:
        from moe_export.zoo.registry import ENTRIES

        if str(model) in ENTRIES:
            from moe_export.zoo.train import build as build_entry

            p = Path(build_entry(str(model), seed=seed))
    if which is not None and which not in CHECKPOINTS:
        raise ValueError(f"which={which!r}: a zoo build holds {', '.join(CHECKPOINTS)}")
    if which is not None and (p / which / "config.json").is_file():
        ref = p / "pretrained" if which == "finetuned" else p / "initial" if which == "pretrained" else None
        ref = ref if ref is not None and (ref / "config.json").is_file() else None
        return ModelFolder(p / which, ref, find_manifest(p / which))
    if not (p / "config.json").is_file():
        raise FolderError(f"{model}: not a zoo build folder or checkpoint (no config.json); build one with "
                          "`moe-export zoo build NAME -o DIR`, or pass a transformers checkpoint folder")
    return ModelFolder(p, None, find_manifest(p))


def load(model: str | os.PathLike, which: str | None = "finetuned", experts_implementation: str = "grouped_mm"):
    """(model, tokenizer) of what ``model`` names, loaded strictly (``moe_export.hf.load_pretrained``): a weight the
    folder lacks is an error, never a random initialisation. A quantized folder keeps its own experts."""
    from transformers import AutoTokenizer

    from moe_export.hf import is_quantized_folder, load_pretrained

    p = resolve(model, which).checkpoint
    loaded = load_pretrained(p, experts_implementation=None if is_quantized_folder(p) else experts_implementation)
    return loaded, AutoTokenizer.from_pretrained(p)
