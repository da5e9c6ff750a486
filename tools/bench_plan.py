"""Cost of planning a checkpoint with Mixtral-8x7B expert shapes, against just reading the bytes.

    python tools/bench_plan.py --dir /tmp/mixtral-shapes --layers 2            # writes the checkpoint once

The checkpoint has Mixtral-8x7B's MoE tensors in its original on-disk format (router [8, 4096],
per-expert w1/w3 [14336, 4096] and w2 [4096, 14336], bf16), one shard per (layer, expert), and
nothing else. Every measurement runs in a fresh child process (clean peak RSS) and is repeated with
a warm page cache (the file was just read) and a cold one (the checkpoint's pages evicted with
posix_fadvise DONTNEED, which only touches these files).

Reported: router+maxvar plan time / time to read the same bytes (routers + w1) with pread, peak RSS,
and a PMQ-like plan on the same layers (per layer: routing statistics and each expert's output
error at every width on T calibration tokens, then the exact knapsack). The checkpoint has no
attention or embeddings, so PMQ's hidden states are synthetic N(0, 1) rows; a real PMQ also runs
the whole model forward, so its time here is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

H, I, E, TOP_K = 4096, 14336, 8, 2


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> None:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from moe_export.io import atomic_path, atomic_write_json

    marker = folder / "bench_manifest.json"
    want = {"layers": layers, "seed": seed, "hidden": H, "intermediate": I, "experts": E, "dtype": "bfloat16"}
    if marker.exists() and json.loads(marker.read_text()) == want:
        return
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    bar = tqdm(total=layers * E, desc="write checkpoint", unit="expert")
    for l in range(layers):
        pre = f"model.layers.{l}.block_sparse_moe"
        for e in range(E):
            t = {}
            if e == 0:
                # rows with different norms so the ranking is not a tie
                t[f"{pre}.gate.weight"] = (torch.randn(E, H, generator=g) * 0.02 * (1 + 0.1 * torch.arange(E))[:, None]).bfloat16()
            scale = 0.02 * (4.0 if e == 5 else 1.0)  # one expert with a wider range: MaxVar has work to do
            for name, shape in (("w1", (I, H)), ("w3", (I, H)), ("w2", (H, I))):
                t[f"{pre}.experts.{e}.{name}.weight"] = (torch.randn(*shape, generator=g) * scale).bfloat16()
            shard = f"model-l{l:02d}-e{e}.safetensors"
            with atomic_path(folder / shard) as tmp:
                save_file(t, str(tmp), metadata={"format": "pt"})
            weight_map.update({k: shard for k in t})
            del t
            bar.update()
    bar.close()
    cfg = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": layers, "num_local_experts": E, "num_experts_per_tok": TOP_K, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16",
    }
    atomic_write_json(folder / "config.json", cfg)
    atomic_write_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    atomic_write_json(marker, want)


def evict(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---- child jobs: each prints one JSON line ------------------------------------------------------


def job_read(folder: Path) -> dict:
    """pread the exact bytes router+maxvar needs (routers + every w1) into one reused buffer."""
    from moe_export.models import checkpoint_moe_layout
    from moe_export.plan.reader import StreamReader

    rd = StreamReader(folder)
    layout = checkpoint_moe_layout(folder)
    base = _rss_mb()
    t, c = time.perf_counter(), time.process_time()
    nbytes = 0
    for k in layout:
        nbytes += rd.read(k.router_key).numel() * 2
        for s in k.first:
            nbytes += rd.read_slice(s, slot=0).numel() * 2
    return {"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c, "bytes": nbytes, "base_rss_mb": base}


def job_plan(folder: Path, method: str) -> dict:
    from moe_export.plan.methods import PlanConfig, make_plan

    levels = [3, 2, 1] if method == "weight-error" else [3, 2]
    base = _rss_mb()
    t, c = time.perf_counter(), time.process_time()
    plan = make_plan(folder, PlanConfig(2.5 if len(levels) == 2 else 2.0, levels, method=method, group_size=128),
                     progress=False)
    return {"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c, "base_rss_mb": base,
            "bits": [l.bits for l in plan.layers]}


def job_pmq(folder: Path, tokens: int) -> dict:
    import torch

    from moe_export.models import checkpoint_moe_layout
    from moe_export.plan import pmq
    from moe_export.plan.reader import StreamReader
    from moe_export.quant.base import get_quantizer

    rd = StreamReader(folder)
    q = get_quantizer("rtn")
    levels = [3, 2]
    base = _rss_mb()
    t, c = time.perf_counter(), time.process_time()
    g = torch.Generator().manual_seed(0)
    bits = []
    for k in checkpoint_moe_layout(folder):
        X = torch.randn(tokens, H, generator=g)  # [T, H] synthetic hidden states
        probs = torch.softmax(X @ rd.read(k.router_key).float().T, -1)  # [T, E]
        w, idx = probs.topk(TOP_K, -1)  # [T, k]
        w = w / w.sum(-1, keepdim=True)
        freq = torch.bincount(idx.reshape(-1), minlength=E).double() / tokens
        wsum = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1).double())
        mean_w = wsum / (freq * tokens).clamp_min(1)
        err = []
        for e in range(E):
            x = X[(idx == e).any(-1)]  # [T_e, H]
            gate, up, down = (rd.read_slice(s[e]).float() for s in (k.gate, k.up, k.down))
            err.append(pmq.output_errors(x, gate, up, down, torch.nn.functional.silu, levels, q, 128, False))
        bits.append(pmq.allocate(freq, mean_w, torch.stack(err), levels, 2.5))
    return {"seconds": time.perf_counter() - t, "cpu_s": time.process_time() - c, "base_rss_mb": base, "bits": bits,
            "tokens": tokens}


def child(args) -> None:
    import torch

    torch.set_num_threads(1)
    folder = Path(args.dir)
    if args.child == "read":
        out = job_read(folder)
    elif args.child == "pmq":
        out = job_pmq(folder, args.pmq_tokens)
    else:
        out = job_plan(folder, args.child)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


def run_child(args, what: str, cold: bool) -> dict:
    folder = Path(args.dir)
    if cold:
        evict(folder)
    else:
        run_child_raw(args, "read")  # warm the page cache with exactly the bytes the plan reads
    return run_child_raw(args, what)


def run_child_raw(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--dir", args.dir, "--layers", str(args.layers), "--child", what,
           "--pmq-tokens", str(args.pmq_tokens)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/moe_export-bench-mixtral-shapes")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pmq-tokens", type=int, default=128)
    ap.add_argument("--skip-pmq", action="store_true")
    ap.add_argument("--weight-error", action="store_true", help="also time the data-free weight-error plan")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    folder = Path(args.dir)
    write_checkpoint(folder, args.layers)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    res = {"layers": args.layers, "checkpoint_gb": size / 1e9, "cpu_threads": 1, "loadavg": os.getloadavg()}
    for cache in ("warm", "cold"):
        reads, plans = [], []
        for _ in range(args.repeats):  # interleaved so load from other processes hits both alike
            reads.append(run_child(args, "read", cold=cache == "cold"))
            plans.append(run_child(args, "router+maxvar", cold=cache == "cold"))
        r, p = min(reads, key=lambda d: d["seconds"]), min(plans, key=lambda d: d["seconds"])
        res[cache] = {
            "read_s": r["seconds"], "read_gb": r["bytes"] / 1e9, "read_gb_per_s": r["bytes"] / 1e9 / r["seconds"],
            "plan_s": p["seconds"], "ratio": p["seconds"] / r["seconds"],
            "read_cpu_s": r["cpu_s"], "plan_cpu_s": p["cpu_s"],
            "plan_peak_rss_mb": max(d["peak_rss_mb"] for d in plans),
            "plan_base_rss_mb": p["base_rss_mb"],
            "all_read_s": [round(d["seconds"], 3) for d in reads], "all_plan_s": [round(d["seconds"], 3) for d in plans],
        }
        res["bits"] = p["bits"]
    if args.weight_error:
        w = run_child(args, "weight-error", cold=False)
        res["weight_error"] = {"plan_s": w["seconds"], "cpu_s": w["cpu_s"], "peak_rss_mb": w["peak_rss_mb"], "bits": w["bits"]}
    if not args.skip_pmq:
        q = run_child(args, "pmq", cold=False)
        res["pmq"] = {"plan_s": q["seconds"], "cpu_s": q["cpu_s"], "peak_rss_mb": q["peak_rss_mb"], "tokens": q["tokens"],
                      "bits": q["bits"]}

    print(f"Mixtral-8x7B shapes, {args.layers} MoE layers, {res['checkpoint_gb']:.2f} GB on disk, 1 CPU thread")
    print(f"load average before: {res['loadavg']}")
    print(f"{'cache':6s} {'read GB':>8s} {'read s':>8s} {'GB/s':>6s} {'plan s':>8s} {'ratio':>6s} "
          f"{'read cpu s':>10s} {'plan cpu s':>10s} {'peak RSS MB':>12s} {'(base)':>7s}")
    for cache in ("warm", "cold"):
        c = res[cache]
        print(f"{cache:6s} {c['read_gb']:8.2f} {c['read_s']:8.3f} {c['read_gb_per_s']:6.2f} {c['plan_s']:8.3f} "
              f"{c['ratio']:6.2f} {c['read_cpu_s']:10.2f} {c['plan_cpu_s']:10.2f} {c['plan_peak_rss_mb']:12.0f} "
              f"{c['plan_base_rss_mb']:7.0f}")
    if "weight_error" in res:
        print(f"weight-error plan (all projections, 3 widths): {res['weight_error']['plan_s']:.1f} s, "
              f"peak RSS {res['weight_error']['peak_rss_mb']:.0f} MB")
    if "pmq" in res:
        print(f"PMQ-like plan ({res['pmq']['tokens']} tokens/layer, synthetic hidden states): {res['pmq']['plan_s']:.1f} s "
              f"(cpu {res['pmq']['cpu_s']:.1f} s), peak RSS {res['pmq']['peak_rss_mb']:.0f} MB; "
              f"{res['pmq']['plan_s'] / res['warm']['plan_s']:.0f}x router+maxvar (warm)")
    if args.json:
        from moe_export.io import atomic_write_json

        atomic_write_json(args.json, res)


if __name__ == "__main__":
    main()
