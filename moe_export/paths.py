"""Where moe_export keeps what it caches (zoo builds, tokenizers, token streams, reproduction runs)."""

from __future__ import annotations

import os
from pathlib import Path


def moe_export_home() -> Path:
    """The cache root: ``$MOE_EXPORT_HOME``, else ``~/.cache/moe_export``."""
    return Path(os.environ.get("MOE_EXPORT_HOME", Path.home() / ".cache" / "moe_export"))
