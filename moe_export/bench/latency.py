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


MIN_REPS = 3  # a variant cut short by the time budget still gets this many timed runs


def interleaved(fns: dict[str, Callable[[], object]], reps: int = 10, warmup: int = 2, progress: bool = True,
                desc: str = "latency", budget_s: float | None = None, burst: int = 1) -> dict[str, dict]:
    """``{name: {"ms": median, "min_ms", "max_ms", "n", "first_call_s"}}``; a variant that raises gets ``{"error": ...}``.

    ``reps`` rounds; in each, every variant runs in turn. ``burst > 1``: a variant's turn is one untimed call and
    then ``burst`` timed calls back to back, so the median is of warm calls (decode steps run back to back in
    use; the first call after another runtime's turn finds caches and predictors full of that runtime), and
    ``n`` = rounds x ``burst``. ``budget_s``: timed seconds a variant may take; one whose calls are slow (e.g.
    seconds each) gets fewer rounds (at least ``MIN_REPS``; single timed calls when even that would not fit)
    and fewer warm-up calls; its ``n`` says how many timed calls it got, still interleaved with the others'."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    out: dict[str, dict] = {}
    live: dict[str, Callable] = {}
    n_of: dict[str, int] = {}
    burst_of: dict[str, int] = {}
    with torch.no_grad():
        for name, fn in fns.items():  # first call (= compile for torch.compile variants) and warm-up, per variant
            try:
                t0 = time.perf_counter()
                fn()
                first = time.perf_counter() - t0
                n, b = reps, burst
                for i in range(warmup):
                    t1 = time.perf_counter()
                    fn()
                    call_s = time.perf_counter() - t1
                    per_round = call_s * (burst + 1 if burst > 1 else 1)
                    if budget_s is not None and per_round * reps > budget_s:
                        if call_s * MIN_REPS > budget_s:  # seconds a call: single timed calls, as many as fit
                            n, b = max(1, int(budget_s / call_s)), 1
                        else:
                            n = max(min(reps, MIN_REPS), int(budget_s / per_round))
                        break  # one warm-up call is enough for a runtime this slow
            except Exception as err:  # one broken runtime must not sink the whole table
                out[name] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
                continue
            out[name] = {"first_call_s": round(first, 3)}
            live[name] = fn
            n_of[name] = n
            burst_of[name] = b
        times: dict[str, list[float]] = {n: [] for n in live}
        for r in tqdm(range(reps), desc=desc, disable=not progress, leave=False):
            for name, fn in live.items():
                if r >= n_of[name]:
                    continue
                if burst_of[name] > 1:
                    fn()
                for _ in range(burst_of[name]):
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


def greedy_run(call, cache_shape, steps: int = 64, first_token: int = 1):
    """A callable running ``steps`` greedy decode steps from an empty cache (llama-bench ``-p 0 -n steps``):
    ``call(tokens [1, 1], pos [1], k, v) -> (logits [1, 1, V], k, v)`` is a decoder step (module or runner);
    each step feeds the argmax of the last one. Its wall time / ``steps`` is the decode time a token."""

    def run():
        k, v = torch.zeros(cache_shape), torch.zeros(cache_shape)
        tok = torch.tensor([[first_token]], dtype=torch.long)
        for pos in range(steps):
            logits, k, v = call(tok, torch.tensor([pos], dtype=torch.long), k, v)
            tok = logits[:, -1:].argmax(-1)  # [1, 1]

    return run
