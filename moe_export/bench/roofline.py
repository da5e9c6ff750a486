"""Memory-bandwidth roofline of one decoded token.

A decode step reads every weight it uses once; at batch 1 that costs far more than the arithmetic, so
``bytes read / bandwidth`` is the fastest a step can be on this machine. The bandwidth is measured in the
same run (one thread, like every timed variant), as the best of a few large copies and reductions.
"""

from __future__ import annotations

import time

import torch
import torch.nn as nn

from moe_export.size import non_expert_bytes, theoretical_bytes


def measure_bandwidth(mbytes: float = 256, reps: int = 5) -> dict[str, float]:
    """GB/s of a ``mbytes`` copy (read + write counted) and sum (read only); best of ``reps``. Buffers larger
    than the last-level cache measure DRAM; a buffer the size of one decode step's weights, read again and
    again, measures what a step can get when its weights stay cached between steps (``cache_resident_GBps``)."""
    calls = bandwidth_calls(mbytes, passes=1)
    times = {"copy": [], "sum": []}
    for _ in range(reps + 1):
        for name in ("copy", "sum"):
            t0 = time.perf_counter()
            calls[name][0]()
            times[name].append(time.perf_counter() - t0)
    copy_gbs = calls["copy"][1] / min(times["copy"][1:]) / 1e9
    sum_gbs = calls["sum"][1] / min(times["sum"][1:]) / 1e9
    return {"copy_GBps": copy_gbs, "sum_GBps": sum_gbs, "GBps": max(copy_gbs, sum_gbs), "buffer_MB": mbytes}


def bandwidth_calls(mbytes: float = 512, passes: int = 4) -> dict[str, tuple]:
    """``{"sum": (call, bytes), "copy": (call, bytes)}``: a read of a ``mbytes`` buffer (larger than the last-level
    cache: DRAM) ``passes`` times, and a copy of it (read + write counted), as turns of a speed phase's interleaved
    rounds. Timed in the same rounds as the runs they bound, the limit and the speeds see the same load: on a shared
    machine the DRAM bandwidth moves by a fifth within minutes (23.5 and 28.1 GB/s in two runs ten minutes apart
    here), more than the gaps the percentages are read for."""
    n = int(mbytes * (1 << 20)) // 4
    a = torch.ones(n)
    b = torch.empty(n)

    def read():
        for _ in range(passes):
            a.sum()

    def copy():
        for _ in range(passes):
            b.copy_(a)

    return {"sum": (read, passes * n * 4), "copy": (copy, passes * 2 * n * 4)}


def bandwidth_from_rounds(timed: dict[str, dict], calls: dict[str, tuple], mbytes: float = 512) -> dict[str, float]:
    """``measure_bandwidth``'s dict from the rounds' timings of :func:`bandwidth_calls` (``timed[name]["min_ms"]``):
    each call's fastest round, as ``measure_bandwidth`` keeps the best of its repeats."""
    gbs = {name: calls[name][1] / (timed[name]["min_ms"] / 1e3) / 1e9 for name in calls}
    return {"copy_GBps": gbs["copy"], "sum_GBps": gbs["sum"], "GBps": max(gbs.values()), "buffer_MB": mbytes,
            "in_rounds": True, "rounds": min(timed[name]["n"] for name in calls)}


def _expert_bytes_per_expert(block, plan_bits: list[int] | None, group_size, symmetric) -> list[float]:
    ex = block.experts
    gu, down = ex.gate_up_proj, ex.down_proj  # [E, 2I, H], [E, H, I]
    E = gu.shape[0]
    if plan_bits is None:
        return [float((gu[0].numel() + down[0].numel()) * 4)] * E
    out = []
    for e in range(E):
        b = plan_bits[e]
        out.append(theoretical_bytes(gu.shape[1], gu.shape[2], b, group_size, symmetric)
                   + theoretical_bytes(down.shape[1], down.shape[2], b, group_size, symmetric))
    return out


def bytes_per_decoded_token(float_model: nn.Module, plan=None) -> dict[str, float]:
    """Weight bytes one decoded token reads: ``top_k`` routed experts per layer (mean over the layer's experts,
    i.e. uniform routing; packed by ``plan`` if given) + every non-expert weight (packed where the plan's
    ``non_expert`` policy gives its role a width) except the embedding table, of which one row is read. The
    static KV cache read is reported apart (``kv_cache``)."""
    from moe_export.export.experts import moe_blocks
    from moe_export.models import parameter_role_lookup
    from moe_export.plan.bitplan import NonExpertPolicy

    cfg = float_model.config
    top_k = cfg.num_experts_per_tok
    experts = 0.0
    expert_ids = set()
    for name, block in moe_blocks(float_model):
        bits = None
        if plan is not None:
            bits = plan.bits_for(next(l.name for l in plan.layers if name.endswith(l.name) or l.name.endswith(name)))
        per = _expert_bytes_per_expert(block, bits, plan.quantizer.group_size if plan else None,
                                       plan.quantizer.symmetric if plan else False)
        experts += top_k * sum(per) / len(per)
        expert_ids.update({id(block.experts.gate_up_proj), id(block.experts.down_proj)})
    emb = float_model.get_input_embeddings().weight
    other = 0.0
    seen = set(expert_ids)
    policy = plan.non_expert_policy() if plan is not None else NonExpertPolicy()
    role_of = parameter_role_lookup(float_model)
    for name, p in float_model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        full = non_expert_bytes(tuple(p.shape), p.element_size(), policy.quant_for(role_of(name)))
        other += full / p.shape[0] if p is emb else full  # one embedding row
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"routed_experts": experts, "non_expert": other, "weights": experts + other,
            "kv_cache_per_128": 2.0 * cfg.num_hidden_layers * cfg.num_key_value_heads * 128 * head_dim * 4}


def limit_ms(nbytes: float, gbps: float) -> float:
    return nbytes / (gbps * 1e9) * 1e3


def cache_resident_GBps(nbytes: float, reps: int = 50) -> float:
    """GB/s of ``sum`` over a buffer of ``nbytes`` (at least 64 KB) read ``reps`` times in a row, best of 3
    blocks: the bandwidth a decode step's weights see when they stay in the caches between steps."""
    n = max(int(nbytes) // 4, 1 << 14)
    a = torch.ones(n)
    a.sum()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a.sum()
        best = min(best, (time.perf_counter() - t0) / reps)
    return n * 4 / best / 1e9


def last_level_cache_bytes() -> int | None:
    """Size of this CPU's last-level cache, read from sysfs (``/sys/devices/system/cpu/cpu0/cache``); None when
    the machine does not say. A decode step whose weights fit stays cache-resident between steps."""
    from pathlib import Path

    best = None
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((idx / "level").read_text())
            if (idx / "type").read_text().strip() == "Instruction":
                continue
            size = (idx / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
        nbytes = int(size.rstrip("KMGkmg")) * mult
        if best is None or level > best[0]:
            best = (level, nbytes)
    return None if best is None else best[1]
