"""CPU timings of one Mixtral-shaped MoE block (H=1024, I=2816, E=8, top-2): float vs packed mixed-width experts.

    python tools/bench_mixed_experts_cpu.py [--tokens 1 8] [--threads 1 2] [--json out.json] [--no-torch-path]

Rows: float experts under transformers' ``batched_mm`` / ``grouped_mm``; packed experts (half the experts at
3 bits, half at 2, RTN group 128) under ``moe_export_mixed`` and, as the dequantize-then-matmul baseline,
under ``batched_mm`` (whose gather dequantizes the routed experts to float). Eager and ``torch.compile``
(fullgraph, static shapes), median ms of N calls after warm-up, plus the compile time of the first call.
``moe_export_mixed`` runs twice: with the C++ CPU kernel (``moe_export::cpu_mixed_width_gemv``, decode up to
16 token-expert pairs) and with it switched off (the inductor-fused torch path, ``--no-torch-path`` skips it).
Each row also gives the expert bytes a decode step must read (routed experts' packed bytes + scales/zeros,
or float weights) divided by the time, against the copy bandwidth of a large ``torch`` copy (read + write).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_block(hidden, inter, experts, top_k, seed=0):
    from moe_export.model_configs import tiny_config
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = tiny_config("MixtralForCausalLM", hidden_size=hidden, expert_intermediate_size=inter, num_experts=experts,
                      top_k=top_k)
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    return block


def quantize_block(block, bits, group_size):
    from moe_export.quant.rtn import RTNQuantizer
    from moe_export.tensors import MixedWidthExpertsTensor

    rtn = RTNQuantizer()
    for proj in ("gate_up_proj", "down_proj"):
        w = getattr(block.experts, proj).detach()
        qws = [rtn.quantize(w[e], bits[e], group_size, False) for e in range(w.shape[0])]
        setattr(block.experts, proj, torch.nn.Parameter(MixedWidthExpertsTensor.from_quantized(qws), requires_grad=False))
    return block


def timed(fn, x, n):
    with torch.no_grad():
        t0 = time.perf_counter()
        fn(x)
        first = time.perf_counter() - t0
        fn(x)
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t0)
    return first, 1e3 * statistics.median(times)


def expert_nbytes(w, e):
    b, s = w.bit_widths[e], w.slots[e]
    return sum(t[s].numel() * t.element_size() for t in (getattr(w, f"{n}_{b}") for n in ("packed", "scale", "zero"))
               if t is not None)


def copy_bandwidth_gbs(mb=256, iters=5):
    src = torch.empty(mb * 2**20 // 4).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / min(times) / 1e9  # read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--no-torch-path", action="store_true", help="skip moe_export_mixed without the C++ kernel")
    ap.add_argument("--no-baseline", action="store_true", help="skip the dequantize-then-batched_mm rows")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from moe_export.runtime import register as register_runtime

    register_runtime()  # the experts implementation, with transformers
    from moe_export.kernels import cpu_ops

    E, k = 8, 2
    bits = [3, 2] * (E // 2)
    rows = []
    float_block = build_block(args.hidden, args.inter, E, k)
    q_block = quantize_block(build_block(args.hidden, args.inter, E, k), bits, 128)
    variants = [("float", float_block, "batched_mm", True), ("float", float_block, "grouped_mm", True),
                ("packed 2/3-bit", q_block, "moe_export_mixed", True)]
    if not args.no_torch_path:
        variants.append(("packed 2/3-bit", q_block, "moe_export_mixed", False))
    if not args.no_baseline:
        variants.append(("packed 2/3-bit", q_block, "batched_mm", True))
    exp_bytes = q_block.experts.gate_up_proj.nbytes_stored() + q_block.experts.down_proj.nbytes_stored()
    float_bytes = sum(p.numel() * 4 for p in float_block.experts.parameters())
    torch.set_num_threads(1)
    bw = copy_bandwidth_gbs()
    print(f"copy bandwidth (1 thread, read + write): {bw:.1f} GB/s", flush=True)
    for threads, t in [(th, t) for th in args.threads for t in args.tokens]:
        torch.set_num_threads(threads)
        x = torch.randn(1, t, args.hidden)
        ref = None
        with torch.no_grad():  # distinct experts this input routes to: the bytes a kernel must read
            logits = x.reshape(t, -1) @ float_block.gate.weight.t()
            routed = logits.topk(k, -1).indices.unique().tolist()
        q_read = sum(expert_nbytes(getattr(q_block.experts, p), e) for e in routed for p in ("gate_up_proj", "down_proj"))
        for name, block, impl, kernel in variants:
            block.experts.config._experts_implementation = impl
            cpu_ops.ENABLED = kernel
            for mode in ("eager", "compiled"):
                if name.startswith("packed") and impl == "batched_mm" and t > 1:
                    continue  # gathers T*k dequantized float experts (GBs at T=64): the T=1 rows say enough
                torch._dynamo.reset()
                fn = block if mode == "eager" else torch.compile(block, fullgraph=True, dynamic=False)
                first, ms = timed(fn, x, args.iters if t == 1 else max(3, args.iters // 3))
                with torch.no_grad():
                    out = fn(x)
                if name == "float" and impl == "batched_mm" and mode == "eager":
                    ref = out
                read = len(routed) * float_bytes / E if name == "float" else q_read
                row = {"threads": threads, "tokens": t, "weights": name,
                       "experts_impl": impl + (" +cpu_kernel" if impl == "moe_export_mixed" and kernel else ""),
                       "mode": mode, "ms": round(ms, 2), "expert_MB_read": round(read / 1e6, 2),
                       "GB/s": round(read / ms / 1e6, 2), "of_copy_bw": round(read / ms / 1e6 / bw, 2),
                       "first_call_s": round(first, 1),
                       "sqnr_vs_float_db": round((10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean())).item(), 1)
                       if name != "float" else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    cpu_ops.ENABLED = True
    print(f"expert bytes: float {float_bytes / 1e6:.1f} MB, "
          f"packed {exp_bytes / 1e6:.1f} MB")
    if args.json:
        from moe_export.io import atomic_write_json

        atomic_write_json(args.json, rows)


if __name__ == "__main__":
    main()
