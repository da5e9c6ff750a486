"""Built-in zoo of small MoE models trained here on local text (see ``moe-export zoo list``).

``build(name, out_dir=None, seed=0) -> Path`` trains (or reuses) an entry; ``resolve(model, which)`` says which
checkpoint a folder or name means (``folders.py``); ``load(model, which="finetuned") -> (model, tokenizer)``;
``ENTRIES`` maps names to their recipes.
"""

from moe_export.zoo.registry import ENTRIES, Entry, TrainSpec, get_entry
from moe_export.zoo.folders import load, resolve
from moe_export.zoo.train import build, default_dir

__all__ = ["ENTRIES", "Entry", "TrainSpec", "build", "default_dir", "get_entry", "load", "resolve"]
