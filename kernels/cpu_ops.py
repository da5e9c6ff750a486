"""CPU custom op for mixed-width expert mat-vecs (decode), backed by a C++ kernel built on first use.

    torch.ops.moe_export.cpu_mixed_width_gemv(x, idx, packed, scale, zero, bits) -> [S, N]

One width group of a ``MixedWidthExpertsTensor``: ``x [S, K]`` float, ``idx [S]`` int64 (slot of pair s's
expert inside the group, -1 where that expert has another width: row of zeros), ``packed`` uint8
``[E_b, N, K*b/8]``, ``scale``/``zero`` float16 ``[E_b, N, K/g]`` (``zero`` None = symmetric). The kernel
(``cpu_mixed_width.cpp``) multiplies straight from the packed bytes in registers; it is compiled with
``torch.utils.cpp_extension.load_inline`` (cached in the torch_extensions dir, ~30-60 s the first time),
with AVX2/FMA when ``/proc/cpuinfo`` lists them. Without a working compiler, or for widths the kernel does
not cover (5-7 bits), the op runs the plain-torch reference (one warning). ``MOE_EXPORT_CPU_KERNEL=0``
turns the op off in ``moe_export_mixed`` (the old inductor path runs instead).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch

KERNEL_BITS = (1, 2, 3, 4, 8)
_SOURCE = Path(__file__).with_name("cpu_mixed_width.cpp")
_modules: dict[bool, object] = {}
_failed = False


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def load(simd: bool = True):
    """The compiled extension (``mixed_width_gemv``, ``has_simd``); ``simd=False`` builds the portable path.
    Raises if the build fails."""
    if simd not in _modules:
        from torch.utils.cpp_extension import load_inline

        flags = ["-O3"]
        cpu = _cpu_flags()
        if simd and {"avx2", "fma"} <= cpu:
            flags += ["-mavx2", "-mfma"] + (["-mf16c"] if "f16c" in cpu else [])  # f16c: one-instruction scale loads
        else:
            flags += ["-DMOE_EXPORT_NO_SIMD"]
        _modules[simd] = load_inline(
            name="moe_export_cpu_mixed_width" + ("" if simd else "_portable"),
            cpp_sources=[_SOURCE.read_text()],
            functions=["mixed_width_gemv", "has_simd"],
            extra_cflags=flags,
            verbose=False,
        )
    return _modules[simd]


def kernel():
    """The default extension, or None (with one warning) when it cannot be built."""
    global _failed
    if _failed:
        return None
    try:
        return load(True)
    except Exception as exc:  # no compiler, no headers, ...
        _failed = True
        warnings.warn(f"moe_export: the C++ CPU kernel did not build ({type(exc).__name__}: {exc}); "
                      "using the plain-torch mixed-width mat-vec instead (slower)", RuntimeWarning, stacklevel=2)
        return None


# Read once (a module constant, so torch.compile guards on it instead of tracing os.environ); benchmarks flip it.
ENABLED = os.environ.get("MOE_EXPORT_CPU_KERNEL", "1") != "0"


def enabled() -> bool:
    """Whether ``moe_export_mixed`` routes CPU decode through the op (env ``MOE_EXPORT_CPU_KERNEL=0``: no)."""
    return ENABLED


def _zconst(bits: int) -> float:
    from moe_export.quant.base import symmetric_zero

    return symmetric_zero(bits)


def reference(x, idx, packed, scale, zero, bits):
    """Plain torch: dequantize the routed experts' rows, one float mat-vec per pair."""
    from moe_export.tensors.functional import dequantize_packed

    k = x.shape[1]
    safe = idx.clamp(min=0)
    w = dequantize_packed(packed[safe], scale[safe], None if zero is None else zero[safe], bits, k, torch.float32)
    y = torch.einsum("snk,sk->sn", w, x.float())  # [S, N]
    return torch.where((idx >= 0).unsqueeze(-1), y, torch.zeros_like(y)).to(x.dtype)


def _validate(x, idx, packed, scale, zero, bits) -> None:
    op = "moe_export::cpu_mixed_width_gemv"
    if x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"{op}: x must be a 2-D float tensor [S, K], got {x.dtype} {tuple(x.shape)}")
    s, k = x.shape
    if idx.dim() != 1 or idx.dtype != torch.int64 or idx.shape[0] != s:
        raise ValueError(f"{op}: idx must be int64 [S={s}], got {idx.dtype} {tuple(idx.shape)}")
    if bits not in range(1, 9):
        raise ValueError(f"{op}: bits must be in 1..8, got {bits}")
    if packed.dim() != 3 or packed.dtype != torch.uint8 or packed.shape[2] * 8 != k * bits:
        raise ValueError(f"{op}: packed must be uint8 [E_b, N, K*b/8] = [*, *, {k * bits // 8}] for K={k}, b={bits}; "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if scale.dim() != 3 or scale.dtype != torch.float16 or scale.shape[:2] != packed.shape[:2]:
        raise ValueError(f"{op}: scale must be float16 [E_b, N, G] matching packed {tuple(packed.shape[:2])}, "
                         f"got {scale.dtype} {tuple(scale.shape)}")
    n_groups = scale.shape[2]
    if n_groups == 0 or k % n_groups or (k // n_groups) % 8:
        raise ValueError(f"{op}: K={k} must split into {n_groups} groups of a multiple of 8")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != torch.float16):
        raise ValueError(f"{op}: zero must be float16 like scale {tuple(scale.shape)}, got {zero.dtype} {tuple(zero.shape)}")


@torch.library.custom_op("moe_export::cpu_mixed_width_gemv", mutates_args=(), device_types="cpu")
def cpu_mixed_width_gemv(x: torch.Tensor, idx: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                         zero: Optional[torch.Tensor], bits: int) -> torch.Tensor:
    ext = kernel() if bits in KERNEL_BITS else None
    if ext is None:
        _validate(x, idx, packed, scale, zero, bits)
        return reference(x, idx, packed, scale, zero, bits)
    # the C++ side checks ranks, dtypes and sizes itself (TORCH_CHECK); decode calls this ~4x per layer
    out = ext.mixed_width_gemv(x if x.dtype == torch.float32 else x.float(), idx, packed, scale, zero, bits,
                               _zconst(bits))
    return out if x.dtype == torch.float32 else out.to(x.dtype)


@cpu_mixed_width_gemv.register_fake
def _(x, idx, packed, scale, zero, bits):
    _validate(x, idx, packed, scale, zero, bits)
    return x.new_empty(x.shape[0], packed.shape[1])
