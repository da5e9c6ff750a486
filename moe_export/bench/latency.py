"""Interleaved latency: every variant is timed once per round, rounds repeat, the median per variant is kept.

Interleaving spreads the noise of a shared CPU (other processes, frequency changes) over all variants
alike, so the ratios between them are trustworthy even when absolute times drift.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from tqdm.auto import tqdm


def interleaved(fns: dict[str, Callable[[], object]], reps: int = 10, warmup: int = 2, progress: bool = True,
                desc: str = "latency") -> dict[str, dict]:
    """``{name: {"ms": median, "min_ms", "max_ms", "n", "first_call_s"}}``; a variant that raises gets ``{"error": ...}``."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    out: dict[str, dict] = {}
    live: dict[str, Callable] = {}
    with torch.no_grad():
        for name, fn in fns.items():  # first call (= compile for torch.compile variants) and warm-up, per variant
            try:
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
                for _ in range(warmup):
                    fn()
            except Exception as err:  # one broken runtime must not sink the whole table
                out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                continue
            out[name] = {"first_call_s": round(first, 3)}
            live[name] = fn
        times: dict[str, list[float]] = {n: [] for n in live}
        for _ in tqdm(range(reps), desc=desc, disable=not progress, leave=False):
            for name, fn in live.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        out[name].update(ms=1e3 * statistics.median(ts), min_ms=1e3 * min(ts), max_ms=1e3 * max(ts), n=len(ts))
    return out


def with_ratios(rows: dict[str, dict], baseline: str) -> dict[str, dict]:
    """Adds ``speedup_vs_<baseline>`` = baseline ms / variant ms (> 1: faster than the baseline)."""
    base = rows.get(baseline, {}).get("ms")
    for r in rows.values():
        if base and "ms" in r:
            r["speedup_vs_baseline"] = base / r["ms"]
    return rows
