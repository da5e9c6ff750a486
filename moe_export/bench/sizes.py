"""Peak RSS while each artifact runs (sizes on disk: ``moe_export.size.disk_bytes``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def peak_rss(kind: str, path: str | os.PathLike, steps: int = 16, timeout: float = 300) -> dict:
    """Runs :mod:`moe_export.bench.rss` in a fresh process; ``{"error": ...}`` if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, "-m", "moe_export.bench.rss", kind, str(path), "--steps", str(steps)],
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])
