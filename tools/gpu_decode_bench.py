"""Short compiled bench of the CUDA expert path (``tools/gpu_check.sh`` runs it): one Mixtral-shaped expert layer
with mixed 2/3/4-bit experts through ``moe_export_mixed`` (the ``cuda_gather`` row of ``runtime.dispatch`` at
decode, ``cuda_grouped`` at prefill) under ``torch.compile``, against the same layer in bf16 float weights
(transformers' ``grouped_mm``), and a bit-level check against the dequantized weights. Prints one markdown table;
on a machine without CUDA it prints why and exits 0.

    python tools/gpu_decode_bench.py [--hidden 4096 --inter 14336 --experts 8 --top-k 2 --json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _layer(hidden, inter, experts, bits, device, dtype):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    from moe_export.tensors import MixedWidthExpertsTensor

    def config(impl):  # one each: the experts implementation is read from the module's config
        cfg = MixtralConfig(hidden_size=hidden, intermediate_size=inter, num_local_experts=experts)
        cfg._experts_implementation = impl
        return cfg

    torch.manual_seed(0)
    ref = MixtralExperts(config("grouped_mm")).to(device=device, dtype=dtype)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    packed = MixtralExperts(config("moe_export_mixed")).to(device=device, dtype=dtype)
    for proj in ("gate_up_proj", "down_proj"):
        w = getattr(ref, proj).detach()
        q = MixedWidthExpertsTensor.from_hp(w.float().cpu(), bits, 128, False, dtype=dtype).to(device)
        setattr(packed, proj, torch.nn.Parameter(q, requires_grad=False))
        with torch.no_grad():
            getattr(ref, proj).copy_(q.dequantize())  # the float reference holds the dequantized weights
    return ref, packed


def _time(fn, *args, iters=50):
    import time

    for _ in range(5):
        fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / iters


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (small shapes make it quick)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_decode_bench: no CUDA device; skipped")
        return 0
    from moe_export.runtime import dispatch, register

    register()
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bits = [(2, 3, 4)[e % 3] for e in range(args.experts)]
    ref, packed = _layer(args.hidden, args.inter, args.experts, bits, device, dtype)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    rows = []
    for tokens in (1, 4, 128):
        x = torch.randn(tokens, args.hidden, device=device, dtype=dtype)
        top_w, top_i = torch.randn(tokens, args.experts, device=device).softmax(-1).topk(args.top_k, dim=-1)
        top_w = top_w.to(dtype)
        formulation = dispatch.select_experts(packed, x, top_i)
        with torch.no_grad():
            want = ref(x, top_i, top_w).float()
            eager = packed(x, top_i, top_w).float()
            f_packed = torch.compile(packed, fullgraph=True, dynamic=False)
            f_ref = torch.compile(ref, fullgraph=True, dynamic=False)
            got = f_packed(x, top_i, top_w).float()
            err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            err_eager = ((eager - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()
            ms_packed = _time(f_packed, x, top_i, top_w)
            ms_float = _time(f_ref, x, top_i, top_w)
        rows.append(dict(device=name, tokens=tokens, formulation=formulation, ms_packed=ms_packed, ms_float=ms_float,
                         rel_err_compiled=err, rel_err_eager=err_eager))
    print(f"\n{name}, hidden {args.hidden}, inter {args.inter}, {args.experts} experts "
          f"(widths {bits}), top-{args.top_k}, {str(dtype).removeprefix('torch.')}, torch.compile\n")
    print("| tokens | formulation | packed ms | float ms | packed/float | rel err compiled | rel err eager |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['formulation']} | {r['ms_packed']:.3f} | {r['ms_float']:.3f} | "
              f"{r['ms_packed'] / r['ms_float']:.2f} | {r['rel_err_compiled']:.2e} | {r['rel_err_eager']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    # bf16 outputs: the dequantized weights are exact in both, the sums round differently (2^-6 of the largest)
    bound = 2**-6 if dtype == torch.bfloat16 else 1e-5
    return 0 if all(r["rel_err_compiled"] < bound and r["rel_err_eager"] < bound for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
