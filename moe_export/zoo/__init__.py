"""Built-in zoo of small MoE models trained here on local text (see ``moe-export zoo list``).

``build(name, out_dir=None, seed=0) -> Path`` trains (or reuses) an entry; ``load(path_or_name,
which="finetuned") -> (model, tokenizer)``; ``ENTRIES`` maps names to their recipes.
"""

from moe_export.zoo.registry import ENTRIES, Entry, TrainSpec, get_entry
from moe_export.zoo.train import build, default_dir, load

__all__ = ["ENTRIES", "Entry", "TrainSpec", "build", "default_dir", "get_entry", "load"]
