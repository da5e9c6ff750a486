"""Where one compiled decode step spends its time, from torch.profiler's per-op self times.

The buckets: ``weight kernels`` (every op that multiplies by a weight: the packed C++ ops, aten mm/bmm/addmm,
grouped mm), ``dynamo frame and guards`` (cache lookup = guard evaluation, the compiled-region prologue),
``compiled graph`` (inductor's wrapper code and its fused C++ kernels: norms, rotary, attention softmax, KV
cache, glue) and ``other ops`` (everything else the graph calls: topk, copies, allocations). The profiler adds
a little per recorded op, so the shares are what to read; the weight-kernel time is a per-step absolute (those
ops run long enough for the profiler's overhead not to matter).
"""

from __future__ import annotations

from typing import Callable

import torch

WEIGHT_OPS = ("moe_export::cpu_moe_ffn", "moe_export::cpu_packed_linear", "moe_export::cpu_mixed_width_gemv",
              "aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::linear", "aten::matmul")
FRAME_OPS = ("TorchDynamo Cache Lookup", "Torch-Compiled Region", "Pregraph bytecode",
             "AOTDispatcher Runtime Wrapper Prologue")
GRAPH_PREFIX = ("## Call CompiledFxGraph", "graph_")


def bucket(name: str) -> str:
    if name in WEIGHT_OPS:
        return "weight kernels"
    if name.startswith(FRAME_OPS):
        return "dynamo frame and guards"
    if name.startswith(GRAPH_PREFIX):
        return "compiled graph"
    return "other ops"


def step_breakdown(fn: Callable[[], object], steps: int = 20, warmup: int = 3) -> dict:
    """Profile ``steps`` calls of ``fn``; ``{"ms_per_step", "buckets": {name: ms}, "weight_kernels_ms", "top": [...]}``
    (times per step, under the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        for _ in range(warmup):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
    buckets: dict[str, float] = {}
    top = []
    for ev in prof.key_averages():
        us = ev.self_cpu_time_total / steps
        if us <= 0:
            continue
        b = bucket(ev.key)
        buckets[b] = buckets.get(b, 0.0) + us / 1e3
        top.append({"op": ev.key[:80], "bucket": b, "ms": us / 1e3, "calls": ev.count / steps})
    top.sort(key=lambda r: -r["ms"])
    total = sum(buckets.values())
    return {"ms_per_step": total, "buckets": dict(sorted(buckets.items(), key=lambda kv: -kv[1])),
            "weight_kernels_ms": buckets.get("weight kernels", 0.0), "top": top[:8], "steps": steps}
