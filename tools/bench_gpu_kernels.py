"""Mixed-width expert kernels vs bf16 baselines and the memory-bandwidth limit, on a CUDA GPU.

Shapes: one Mixtral-8x7B MoE layer (H=4096, I=14336, E=8, top-2): ``gate_up_proj [8, 28672, 4096]`` and
``down_proj [8, 4096, 14336]``, group size 128, asymmetric. For each scenario (decode with a few tokens,
prefill with many) and each width plan it times, after a correctness check against the plain-torch
reference:

* ``triton``: ``moe_export::mixed_width_gather_mm`` (decode) / ``mixed_width_grouped_mm`` (prefill);
* ``bf16 grouped_mm``: ``torch._grouped_mm`` on bf16 weights, tokens sorted by expert;
* ``bf16 bmm``: gather the routed experts' bf16 weights and ``torch.bmm`` (transformers' batched_mm);
* ``bound``: bytes the kernel must read (packed weights + scales/zeros of the routed experts, activations
  in and out) / the device's copy bandwidth, measured here with a large device-to-device copy.

Prints µs per projection and achieved GB/s (bytes the kernel must read / its time). Writes JSON with
``--json``. Without CUDA it exits with a message (``--smoke`` runs tiny shapes through the Triton
interpreter on the CPU to check the script's plumbing; its timings mean nothing).

    python tools/bench_gpu_kernels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch

MIXTRAL = dict(hidden=4096, inter=14336, experts=8, top_k=2)
TINY = dict(hidden=64, inter=96, experts=4, top_k=2)
PLANS = {  # expert bit widths of the layer
    "2-bit": [2] * 8, "3-bit": [3] * 8, "4-bit": [4] * 8,
    "mixed 2/3 (2.5 avg)": [3, 2, 3, 2, 2, 3, 3, 2],
}


@dataclass(frozen=True)
class ExperimentConfig:
    scenario: str  # "decode" | "prefill"
    tokens: int
    plan: str
    proj: str  # "gate_up" | "down"


@dataclass(frozen=True)
class ExperimentResult:
    config: ExperimentConfig
    triton_us: float
    grouped_mm_bf16_us: float | None
    bmm_bf16_us: float | None
    bound_us: float
    bytes_read: int
    achieved_gbps: float
    max_abs_err: float


def width_groups(bits: list[int], n: int, k: int, group_size: int, device, gen) -> tuple:
    """Random codes and plausible scales/zeros in the width-group layout (values do not matter for speed)."""
    from moe_export.runtime.layout import pack

    widths = sorted(set(bits))
    slot = torch.zeros(len(bits), dtype=torch.int64)
    packed, scales, zeros = [], [], []
    for b in widths:
        members = [e for e, eb in enumerate(bits) if eb == b]
        slot[members] = torch.arange(len(members))
        q = torch.randint(0, 2**b, (len(members), n, k), dtype=torch.uint8, device=device, generator=gen)
        packed.append(pack(q, b))
        del q
        shape = (len(members), n, k // group_size)
        scales.append((torch.rand(shape, device=device, generator=gen) * 0.02 / 2**b + 1e-4).half())
        zeros.append((torch.rand(shape, device=device, generator=gen) * (2**b - 1)).half())
    return packed, scales, zeros, widths, torch.tensor(bits, device=device), slot.to(device)


def dense_bf16(args, k: int) -> torch.Tensor:
    """bf16 ``[E, N, K]`` of the same experts, one expert at a time (the fp32 copy of all would not fit)."""
    from moe_export.kernels import reference

    packed, scales, zeros, widths, ebits, slot = args
    e_count = ebits.shape[0]
    n = packed[0].shape[1]
    out = torch.empty(e_count, n, k, dtype=torch.bfloat16, device=packed[0].device)
    for e in range(e_count):
        out[e] = reference.expert_weight(e, packed, scales, zeros, widths, ebits.tolist(), slot.tolist(), k)
    return out


def routed_bytes(args, expert_ids: torch.Tensor, s_rows: int, k: int, x_bytes: int) -> int:
    """Bytes a kernel must read and write: each routed expert's packed weights + scales/zeros once,
    activations in, outputs out."""
    packed, scales, zeros, widths, ebits, slot = args
    total = 0
    for e in expert_ids.unique().tolist():
        i = widths.index(int(ebits[e]))
        total += packed[i][0].numel() + scales[i][0].numel() * 2 + (zeros[i][0].numel() * 2 if zeros[i] is not None else 0)
    n = packed[0].shape[1]
    return total + s_rows * k * x_bytes + s_rows * n * x_bytes


def copy_bandwidth(device) -> float:
    """Device-to-device copy GB/s (read + write) of a 1 GiB buffer: the practical bandwidth limit."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def timer(smoke: bool):
    if smoke:
        def wall(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return wall
    import triton.testing

    return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)


def run(shape: dict, scenarios: dict, plans: dict, device, smoke: bool, group_size: int,
        gather_mm=None, grouped_mm=None) -> list[ExperimentResult]:
    from tqdm import tqdm

    from moe_export.kernels import reference

    gather_mm = gather_mm or torch.ops.moe_export.mixed_width_gather_mm
    grouped_mm = grouped_mm or torch.ops.moe_export.mixed_width_grouped_mm

    bench = timer(smoke)
    gen = torch.Generator(device=device).manual_seed(0)
    h, i2, i = shape["hidden"], 2 * shape["inter"], shape["inter"]
    e, top_k = shape["experts"], shape["top_k"]
    x_dtype = torch.float32 if smoke else torch.bfloat16
    bw = None if smoke else copy_bandwidth(device)
    results = []
    jobs = [(plan, proj) for plan in plans for proj in ("gate_up", "down")]
    for plan, proj in tqdm(jobs, desc="bench", unit="weight"):
        bits = plans[plan][:e]
        n, k = (i2, h) if proj == "gate_up" else (h, i)
        args = width_groups(bits, n, k, group_size, device, gen)
        dense = None if smoke else dense_bf16(args, k)
        for scenario, tokens in scenarios.items():
            s_rows = tokens * top_k
            # each token's top-k experts are distinct
            ids = torch.rand(tokens, e, device=device, generator=gen).argsort(-1)[:, :top_k].reshape(-1)  # [S]
            x = torch.randn(s_rows, k, device=device, generator=gen, dtype=torch.float32).to(x_dtype)
            if scenario == "decode":
                run_kernel = lambda: gather_mm(x, ids, *args)  # noqa: E731
                ref = reference.gather_mm(x, ids, *args)
            else:
                ids, _ = torch.sort(ids)
                offs = torch.cumsum(torch.bincount(ids, minlength=e), 0).to(torch.int32)
                run_kernel = lambda: grouped_mm(x, offs, *args)  # noqa: E731
                ref = reference.grouped_mm(x, offs, *args)
            out = run_kernel()
            err = (out.float() - ref.float()).abs().max().item()
            scale = ref.float().abs().max().item()
            if err > 2e-2 * scale:  # bf16 inputs and bf16-rounded weights in the dot: ~2^-8 relative per term
                raise SystemExit(f"{plan} {proj} {scenario}: kernel disagrees with the reference (max abs err {err:.3e}, max |ref| {scale:.3e})")
            t_kernel = bench(run_kernel)
            t_grouped = t_bmm = None
            if dense is not None:
                s_ids, perm = torch.sort(ids)
                offs_b = torch.cumsum(torch.bincount(s_ids, minlength=e), 0).to(torch.int32)
                xs = x[perm]
                w_t = dense.transpose(-2, -1)  # [E, K, N]
                t_grouped = bench(lambda: torch._grouped_mm(xs, w_t, offs=offs_b))
                if scenario == "decode":  # the gathered copy of S expert weights is the baseline's own cost
                    t_bmm = bench(lambda: torch.bmm(x.unsqueeze(1), dense[ids].transpose(-2, -1)))
            nbytes = routed_bytes(args, ids, s_rows, k, x.element_size())
            bound = nbytes / (bw * 1e9) * 1e3 if bw else float("nan")
            results.append(ExperimentResult(ExperimentConfig(scenario, tokens, plan, proj), t_kernel * 1e3,
                                            None if t_grouped is None else t_grouped * 1e3,
                                            None if t_bmm is None else t_bmm * 1e3, bound * 1e3, nbytes,
                                            nbytes / (t_kernel * 1e-3) / 1e9, err))
        del args, dense
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if bw:
        print(f"device copy bandwidth: {bw:.0f} GB/s (read + write)")
    return results


def print_table(results: list[ExperimentResult]) -> None:
    head = f"{'scenario':8} {'tok':>5} {'plan':20} {'proj':7} {'triton us':>10} {'bf16 gmm us':>11} {'bf16 bmm us':>11} {'bound us':>9} {'GB/s':>7} {'% bound':>7}"
    print(head)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in results:
        c = r.config
        pct = 100 * r.bound_us / r.triton_us if r.bound_us == r.bound_us else float("nan")
        print(f"{c.scenario:8} {c.tokens:>5} {c.plan:20} {c.proj:7} {r.triton_us:>10.1f} {fmt(r.grouped_mm_bf16_us):>11} "
              f"{fmt(r.bmm_bf16_us):>11} {r.bound_us:>9.1f} {r.achieved_gbps:>7.0f} {pct:>6.0f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--decode-tokens", type=int, default=1)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS))
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes on the CPU through the Triton interpreter: checks the script, times nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke needs TRITON_INTERPRET=1 in the environment")
        device = torch.device("cpu")
        shape, scenarios, group_size = TINY, {"decode": 2, "prefill": 24}, 32
        # on the CPU the ops run the reference; call the Triton launchers (interpreted) with fixed tiles instead
        from moe_export.kernels import mixed_width_matmul as mwm

        kernels = dict(gather_mm=lambda *a: mwm.gather_mm(*a, config=dict(BLOCK_N=32, BLOCK_K=32)),
                       grouped_mm=lambda *a: mwm.grouped_mm(*a, config=dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)))
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu_kernels: no CUDA device here. This benchmark needs an NVIDIA GPU (Ampere or "
                             "Hopper) with triton installed; run it there. (--smoke checks the script on the CPU.)")
        device = torch.device("cuda")
        shape, scenarios, group_size = MIXTRAL, {"decode": args.decode_tokens, "prefill": args.prefill_tokens}, args.group_size
        kernels = {}
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    results = run(shape, scenarios, {p: PLANS[p] for p in args.plans}, device, args.smoke, group_size, **kernels)
    print_table(results)
    if args.json:
        from moe_export.io import atomic_write_json

        atomic_write_json(args.json, [dict(asdict(r), config=asdict(r.config)) for r in results], indent=1)


if __name__ == "__main__":
    sys.exit(main())
