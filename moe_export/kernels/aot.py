"""Compile the mixed-width kernels for a CUDA architecture without a GPU.

Triton ships its own ``ptxas``, so ``triton.compile`` can lower a kernel to a cubin for sm80 (Ampere) or
sm90 (Hopper) on any machine. That checks what the interpreter cannot: that every width and every
autotune config passes the real code generator, and how many registers, spills and shared memory it
needs. Run in a process where ``TRITON_INTERPRET`` is unset (the kernels must be real ``JITFunction``s):

    python -m moe_export.kernels.aot --arch 80 90
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

import torch

_PTR_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    kind: str
    arch: int
    bits: int
    x_dtype: str
    config: str
    registers: int
    spill_bytes: int  # stack + local memory per thread: > 0 means the tile spills out of registers
    shared_bytes: int
    seconds: float


def _signature(kernel, x_dtype: torch.dtype, constexprs: dict) -> tuple[dict, dict]:
    ptrs = {"x_ptr": _PTR_TYPES[x_dtype], "out_ptr": _PTR_TYPES[x_dtype], "ids_ptr": "*i64", "offs_ptr": "*i32",
            "ebits_ptr": "*i64", "slot_ptr": "*i64", "w_ptr": "*u8", "s_ptr": "*fp16", "z_ptr": "*fp16"}
    sig, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptrs:
            sig[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]  # what a launch with aligned torch tensors specialises on
        else:
            sig[name] = "i32"
            if name.startswith("stride_") and name not in ("stride_wn", "stride_sn"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _resources(cubin: bytes) -> tuple[int, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    cuobjdump = os.path.join(os.path.dirname(get_ptxas(80).path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", text).group(1))
    # register spills land in the stack frame (STACK) or in local memory (LOCAL)
    spill = int(re.search(r"STACK:(\d+)", text).group(1)) + int(re.search(r"LOCAL:(\d+)", text).group(1))
    return regs, spill


def compile_one(kind: str, arch: int, bits: int, config, *, group_size: int = 128, has_zero: bool = True,
                x_dtype: torch.dtype = torch.bfloat16, num_experts: int = 8) -> CompiledKernel:
    """``kind`` in {"gather", "grouped", "dequant"}; ``config`` a ``triton.Config``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from moe_export.kernels import mixed_width_matmul as mwm
    from moe_export.runtime.layout import symmetric_zero

    kernel = {"gather": mwm._gather_mm_kernel, "grouped": mwm._grouped_mm_kernel, "dequant": mwm._dequant_kernel}[kind]
    if not isinstance(kernel, JITFunction):
        raise RuntimeError("AOT compilation needs real Triton kernels: run it with TRITON_INTERPRET unset")
    constexprs = dict(BITS=bits, G=group_size, HAS_ZERO=has_zero, SYM_ZERO=symmetric_zero(bits), FAULT_BIT_SHIFT=0,
                      **config.kwargs)
    if kind == "grouped":
        constexprs.update(E_POW2=triton.next_power_of_2(num_experts),
                          DOT_PRECISION="ieee" if x_dtype == torch.float32 else "tf32")
    if kind == "dequant":
        constexprs.update(OUTPUT_Q=False, TRANS=False)
    sig, attrs = _signature(kernel, x_dtype, constexprs)
    if kind == "dequant":
        sig["out_ptr"] = "*fp32"
    t0 = time.perf_counter()
    compiled = triton.compile(ASTSource(kernel, sig, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    seconds = time.perf_counter() - t0
    regs, spill = _resources(compiled.asm["cubin"])
    blocks = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return CompiledKernel(kind, arch, bits, str(x_dtype).removeprefix("torch."),
                          f"{blocks},w={config.num_warps},s={config.num_stages}", regs, spill, compiled.metadata.shared,
                          seconds)


def configs_for(kind: str, arch: int, x_dtype: torch.dtype) -> list:
    """The autotune list a launch on this architecture with these activations uses."""
    from moe_export.kernels import mixed_width_matmul as mwm

    table = {"gather": mwm.GATHER_CONFIGS, "grouped": mwm.GROUPED_CONFIGS}[kind]
    if kind == "grouped" and x_dtype == torch.float32:
        return table["fp32"]
    return table["hopper" if arch >= 90 else "ampere"]


def sweep(archs=(80, 90), widths=(1, 2, 3, 4, 8), kinds=("gather", "grouped"), x_dtypes=(torch.bfloat16,),
          **kw) -> list[CompiledKernel]:
    """Every autotune config of every kind, width, activation dtype and architecture."""
    from tqdm import tqdm

    jobs = [(kind, arch, bits, config, dt) for dt in x_dtypes for arch in archs for kind in kinds for bits in widths
            for config in configs_for(kind, arch, dt)]
    return [compile_one(kind, arch, bits, config, x_dtype=dt, **kw)
            for kind, arch, bits, config, dt in tqdm(jobs, desc="compiling", unit="kernel")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--kind", nargs="+", default=["gather", "grouped"])
    parser.add_argument("--dtype", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: AOT compilation needs real Triton kernels")
    rows = sweep(tuple(args.arch), tuple(args.bits), tuple(args.kind), tuple(getattr(torch, d) for d in args.dtype))
    print(f"{'kind':8} {'sm':>3} {'b':>2} {'x':9} {'regs':>4} {'spill':>5} {'smem':>6} {'s':>5}  config")
    for r in rows:
        print(f"{r.kind:8} {r.arch:>3} {r.bits:>2} {r.x_dtype:9} {r.registers:>4} {r.spill_bytes:>5} {r.shared_bytes:>6} "
              f"{r.seconds:5.1f}  {r.config}")


if __name__ == "__main__":
    main()
