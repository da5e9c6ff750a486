"""CPU custom op for mixed-width expert mat-vecs (decode), backed by a C++ kernel built on first use.

    torch.ops.moe_export.cpu_mixed_width_gemv(x, idx, packed, scale, zero, bits) -> [S, N]

One width group of a ``MixedWidthExpertsTensor``: ``x [S, K]`` float, ``idx [S]`` int64 (slot of pair s's
expert inside the group, -1 where that expert has another width: row of zeros), ``packed`` uint8
``[E_b, N, K*b/8]``, ``scale``/``zero`` float16 ``[E_b, N, K/g]`` (``zero`` None = symmetric). The kernel
(``cpu_mixed_width.cpp`` around the header-only core ``core/mixed_width.h``) multiplies straight from the packed
bytes in registers, every width 1..8; it is compiled with ``torch.utils.cpp_extension.load_inline`` (cached in
the torch_extensions dir, ~60-120 s the first time) for the baseline ISA, and the core picks its vector path
(AVX2, AVX-VNNI, AVX-512 VNNI) at run time (:func:`kernel_path`). Without a working compiler the op runs the
plain-torch reference (one warning). ``MOE_EXPORT_CPU_KERNEL=0``
turns the op off in ``moe_export_mixed`` (the old inductor path runs instead).

The same build registers two dispatcher ops (C++ all the way, so a compiled graph calls the kernel with no
Python function in between; their fake kernels are registered here once the build is loaded):

    torch.ops.moe_export.cpu_moe_ffn(x, topk_ids, topk_weights, expert_bits, slots, bits,
                                     up_packed, up_scale, up_zero, down_packed, down_scale, down_zero) -> [T, H]
    torch.ops.moe_export.cpu_packed_linear(x, packed, scale, zero, bits) -> [..., N]

``cpu_moe_ffn`` is a whole routed SwiGLU expert layer at decode (gate_up mat-vec, SiLU(gate) * up, down
mat-vec, routing-weighted sum over the top-k pairs; every width group in one call); ``cpu_packed_linear``
is one packed 2-D weight (quantized attention / lm_head). They exist only after :func:`fused_ready`
returned True; callers check it first (it is a compile-time constant for ``torch.compile``).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from moe_export.runtime.layout import dequantize_packed, symmetric_zero

KERNEL_BITS = tuple(range(1, 9))
_DIR = Path(__file__).parent
_SOURCE = _DIR / "cpu_mixed_width.cpp"
_CORE = _DIR / "core" / "mixed_width.h"
_modules: dict[bool, object] = {}
_failed = False
_lock = threading.RLock()


def load(simd: bool = True):
    """The compiled extension (``mixed_width_gemv``, ``has_simd``, ``kernel_path``, ``moe_ffn``, ``packed_linear``,
    ``packed_gather``); ``simd=False`` builds the scalar path only. Raises if the build fails. Thread-safe (the
    benchmark builds it in the background)."""
    with _lock:
        return _load(simd)


def _openmp_flags() -> list[str]:
    """at::parallel_for (the kernels' output-row split across intra-op threads) is inline OpenMP in ATen's
    headers: built without -fopenmp it compiles to a serial loop, silently. On Linux (gcc) the library then links
    the libgomp torch has already loaded; elsewhere the compiler may lack the flag, and a serial build beats none."""
    return ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def _load(simd: bool):
    if simd not in _modules:
        from torch.utils.cpp_extension import load_inline

        source = _SOURCE.read_text()
        # The build is for the baseline ISA: the core picks AVX2 / AVX-VNNI / AVX-512 VNNI per function at run
        # time. Its name carries a hash of both sources: load_inline hashes only the .cpp, and worktrees or
        # versions with other sources must not rebuild over each other's cached library.
        openmp = _openmp_flags()
        flags = ["-O3", *openmp]
        digest = hashlib.sha256((source + _CORE.read_text() + " ".join(flags)).encode()).hexdigest()[:12]
        if not simd:
            flags += ["-DMOE_EXPORT_CORE_SCALAR_ONLY", "-DMOE_EXPORT_NO_OPS"]  # the dispatcher ops: default build only
        _modules[simd] = load_inline(
            name=f"moe_export_cpu_mixed_width{'' if simd else '_portable'}_{digest}",
            cpp_sources=[source],
            functions=["mixed_width_gemv", "has_simd", "kernel_path", "set_kernel_path", "path_available", "moe_ffn",
                       "packed_linear", "packed_gather", "parallel_threads"],
            extra_cflags=flags,
            extra_ldflags=openmp,
            extra_include_paths=[str(_DIR)],
            verbose=False,
        )
        if simd:
            _register_fakes()
    return _modules[simd]


def kernel_path() -> str:
    """Which vector path the C++ kernels run on this CPU ("avx512-vnni", "avx-vnni", "avx2" or "scalar"; forced
    by ``MOE_EXPORT_CPU_PATH``), or "torch" when the extension is off or did not build (benchmarks record it)."""
    ext = kernel() if enabled() else None
    return "torch" if ext is None else ext.kernel_path()


def path_available(name: str) -> bool:
    """Whether this CPU (and build) can run the named vector path."""
    ext = kernel()
    return ext is not None and ext.path_available(name)


@contextlib.contextmanager
def forced_path(name: str):
    """Run the C++ kernels on the named path inside the block (tests compare paths in one process); raises
    RuntimeError when the CPU lacks it. Process-wide: not for concurrent use."""
    ext = load(True)
    before = ext.kernel_path()
    ext.set_kernel_path(name)
    try:
        yield
    finally:
        ext.set_kernel_path(before)


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

# The arithmetic of the fused ops (cpu_moe_ffn, cpu_packed_linear): "exact" multiplies fp32 activations (the
# dequantize formula, summed in another order); "int8" quantizes each activation row to int8 per block of the
# group size and runs integer dot products (core/mixed_width.h), 42-47 dB SQNR against exact per width and
# several times faster at decode (docs/benchmarks.md), the arithmetic CPU runtimes deploy (llama.cpp's k-quants,
# onnxruntime's MatMulNBits at accuracy level 4). Inference defaults to it; quality numbers do not: eval and
# the exported artifacts' parity checks score the weights with "exact" (``use_accuracy``).
# MOE_EXPORT_ACCURACY or set_accuracy / moe_export.runtime.register(accuracy=...) picks another. A module
# constant, so torch.compile guards on it (changing it recompiles).
ACCURACIES = {"exact": 0, "int8": 1}
DEFAULT_ACCURACY = "int8"


def _accuracy_from_env() -> str:
    name = os.environ.get("MOE_EXPORT_ACCURACY", DEFAULT_ACCURACY)
    if name not in ACCURACIES:
        raise ValueError(f"MOE_EXPORT_ACCURACY must be one of {sorted(ACCURACIES)}, got {name!r}")
    return name


ACCURACY = ACCURACIES[_accuracy_from_env()]


def accuracy() -> str:
    """The fused ops' arithmetic now: "exact" or "int8"."""
    return next(k for k, v in ACCURACIES.items() if v == ACCURACY)


def set_accuracy(name: str) -> str:
    """Set the fused ops' arithmetic ("exact" or "int8") for this process; returns the previous one."""
    global ACCURACY
    if name not in ACCURACIES:
        raise ValueError(f"accuracy must be one of {sorted(ACCURACIES)}, got {name!r}")
    before = accuracy()
    ACCURACY = ACCURACIES[name]
    return before


@contextlib.contextmanager
def use_accuracy(name: str):
    """``set_accuracy`` inside the block only (tests that assert parity with a float model use "exact")."""
    before = set_accuracy(name)
    try:
        yield
    finally:
        set_accuracy(before)


def enabled() -> bool:
    """Whether ``moe_export_mixed`` routes CPU decode through the op (env ``MOE_EXPORT_CPU_KERNEL=0``: no)."""
    return ENABLED


def _zconst(bits: int) -> float:
    return symmetric_zero(bits)


def reference(x, idx, packed, scale, zero, bits):
    """Plain torch: dequantize the routed experts' rows, one float mat-vec per pair."""
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


# --------------------------------------------------------------------------- the fused dispatcher ops

FUSED_WIDTHS = KERNEL_BITS


# Whether torch.export may record the C++ ops: only for a program that runs in this process's torch (an
# AOTInductor step, ``export.aot``), never for a .pte or .onnx, whose runtimes lack them.
_IN_EXPORT = False


@contextlib.contextmanager
def ops_in_export():
    """Let ``torch.export`` inside the block record the C++ ops (a program for AOTInductor in this process)."""
    global _IN_EXPORT
    before, _IN_EXPORT = _IN_EXPORT, True
    try:
        yield
    finally:
        _IN_EXPORT = before


def runs_on(x: torch.Tensor) -> bool:
    """Whether the C++ ops may take ``x``: a CPU tensor, the ops enabled, and not under ``torch.export`` (an
    exported graph must not name ops its runtime lacks) unless inside ``ops_in_export``."""
    return x.device.type == "cpu" and enabled() and (_IN_EXPORT or not torch.compiler.is_exporting())


def fused_runs_on(x: torch.Tensor) -> bool:
    """``runs_on`` for the fused ops (``cpu_moe_ffn``, ``cpu_packed_linear``): float32 only, and built."""
    return x.dtype == torch.float32 and runs_on(x) and fused_ready()


@torch.compiler.assume_constant_result
def fused_ready() -> bool:
    """Whether ``cpu_moe_ffn`` / ``cpu_packed_linear`` exist: the default build loaded (built on the first
    call). Under ``torch.compile`` it runs once at trace time and its answer is baked into the graph."""
    return kernel() is not None


def _fail(op: str, msg: str):
    raise ValueError(f"moe_export::{op}: {msg}")


def _check_group(op, what, packed, scale, zero, bits, k, rank):
    if bits not in FUSED_WIDTHS:
        _fail(op, f"{what}: bits must be one of {FUSED_WIDTHS}, got {bits}")
    if packed.dim() != rank or packed.dtype != torch.uint8 or packed.shape[-1] * 8 != k * bits:
        _fail(op, f"{what}: packed must be uint8 of rank {rank} with K*b/8 = {k * bits // 8} bytes a row "
                  f"(K={k}, b={bits}); got {packed.dtype} {tuple(packed.shape)}")
    if scale.dim() != rank or scale.dtype != torch.float16 or scale.shape[:-1] != packed.shape[:-1]:
        _fail(op, f"{what}: scale must be float16 {tuple(packed.shape[:-1])} + [G], got {scale.dtype} {tuple(scale.shape)}")
    g = scale.shape[-1]
    if g == 0 or k % g or (k // g) % 8:
        _fail(op, f"{what}: K={k} must split into {g} groups of a multiple of 8")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != torch.float16):
        _fail(op, f"{what}: zero must be float16 like scale {tuple(scale.shape)}, got {zero.dtype} {tuple(zero.shape)}")


def check_moe_ffn(op, x, topk_ids, topk_weights, expert_bits, slots, bits, up_packed, up_scale, up_zero, down_packed,
                  down_scale, down_zero) -> None:
    """The arguments of a whole routed SwiGLU expert layer (``cpu_moe_ffn``, and the native .pte op
    ``mixed_width_moe``): one clear ``ValueError`` naming ``op`` and the argument."""
    if x.dim() != 2 or x.dtype != torch.float32:
        _fail(op, f"x must be float32 [T, H], got {x.dtype} {tuple(x.shape)}")
    t, h = x.shape
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int64 or topk_ids.shape[0] != t:
        _fail(op, f"topk_ids must be int64 [T={t}, k], got {topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or not topk_weights.dtype.is_floating_point:
        _fail(op, f"topk_weights must be a float tensor shaped like topk_ids {tuple(topk_ids.shape)}, got "
                  f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    n = len(bits)
    if n == 0 or any(len(v) != n for v in (up_packed, up_scale, up_zero, down_packed, down_scale, down_zero)):
        _fail(op, f"one packed/scale/zero entry per width for both projections ({n} widths)")
    if len(expert_bits) != len(slots) or not expert_bits or set(expert_bits) - set(bits):
        _fail(op, f"expert_bits {list(expert_bits)} / slots {list(slots)}: one entry per expert, widths among {list(bits)}")
    inter = None
    for b, pu, su, zu, pd, sd, zd in zip(bits, up_packed, up_scale, up_zero, down_packed, down_scale, down_zero):
        _check_group(op, "gate_up", pu, su, zu, b, h, 3)
        if pu.shape[1] % 2 or (inter is not None and pu.shape[1] != 2 * inter):
            _fail(op, "gate_up rows must be 2*I, the same for every width")
        inter = pu.shape[1] // 2
        _check_group(op, "down", pd, sd, zd, b, inter, 3)
        if pd.shape[:2] != (pu.shape[0], h):
            _fail(op, f"down stack of width {b} is {tuple(pd.shape)}, expected [{pu.shape[0]}, {h}, {inter * b // 8}]")


def _moe_ffn_fake(x, topk_ids, topk_weights, expert_bits, slots, bits, up_packed, up_scale, up_zero, down_packed,
                  down_scale, down_zero, accuracy=0):
    check_moe_ffn("cpu_moe_ffn", x, topk_ids, topk_weights, expert_bits, slots, bits, up_packed, up_scale, up_zero,
                  down_packed, down_scale, down_zero)
    return x.new_empty(x.shape)


def check_packed_linear(op, x, packed, scale, zero, bits) -> None:
    """The arguments of one packed 2-D linear (``cpu_packed_linear``, the native .pte op ``packed_linear``)."""
    if x.dim() < 1 or x.dtype != torch.float32:
        _fail(op, f"x must be float32 [..., K], got {x.dtype} {tuple(x.shape)}")
    _check_group(op, "weight", packed, scale, zero, bits, x.shape[-1], 2)


def _packed_linear_fake(x, packed, scale, zero, bits, accuracy=0):
    check_packed_linear("cpu_packed_linear", x, packed, scale, zero, bits)
    return x.new_empty(*x.shape[:-1], packed.shape[0])


_fakes_done = False


def _register_fakes() -> None:
    global _fakes_done
    if not _fakes_done:
        torch.library.register_fake("moe_export::cpu_moe_ffn")(_moe_ffn_fake)
        torch.library.register_fake("moe_export::cpu_packed_linear")(_packed_linear_fake)
        _fakes_done = True
