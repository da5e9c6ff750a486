"""The ExecuTorch kernel library of the native ``.pte`` ops, built on first use and loaded into this process.

    from moe_export.kernels import et_native
    et_native.load()          # builds (once per machine and source) and loads it with RTLD_GLOBAL
    et_native.kernel_path()   # "avx512-vnni" | "avx-vnni" | "avx2" | "scalar": the path the core picked
    with et_native.serial_delegates():  # load a native program's methods: XNNPACK without the runtime's pool
        method = program.load_method("forward")

``et_ops.cpp`` (the glue) + ``core/mixed_width.h`` (the kernel core the torch extension compiles too) are
compiled with the system C++ compiler against the executorch wheel's headers and ``libexecutorch.so`` (plus its
threadpool), the flags of /work/shared/kernel-notes.md: ``C10_USING_CUSTOM_GENERATED_MACROS`` for the vendored c10
headers, ``ET_EVENT_TRACER_ENABLED`` as the shipped libraries are built (else profiling scopes record nothing),
``ET_USE_THREADPOOL`` for the runtime's threadpool. The library goes to
``$MOE_EXPORT_HOME/kernels/et-<hash>/`` (the hash covers the sources, flags, compiler and executorch version), so
a new source or wheel builds a new one and concurrent first uses wait for one build. Loading it with
``RTLD_GLOBAL`` before a program registers the kernels into the runtime the Python bindings use; without it a
native program fails ``load_method`` with OperatorMissing (0x14). On-device runtimes build the same sources
with ``moe_export/kernels/CMakeLists.txt``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

_HERE = Path(__file__).resolve().parent
SOURCES = (_HERE / "et_ops.cpp", _HERE / "core" / "mixed_width.h")
LIB_NAME = "libmoe_export_et_ops.so"
_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None


class NativeKernelError(RuntimeError):
    """The kernel library cannot be built or loaded (one line: what is missing and what to do)."""


def _executorch_dir() -> Path:
    import executorch.version  # executorch is a namespace package: locate it through a module inside it

    return Path(executorch.version.__file__).resolve().parent


def compiler() -> str:
    """``$CXX``, else the first of c++, g++, clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        found = shutil.which(cxx)
        if found is None:
            raise NativeKernelError(f"CXX={cxx} is not an executable; the native .pte kernels need a C++17 compiler")
        return found
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    raise NativeKernelError("no C++ compiler found (set CXX or install g++): the native .pte kernels "
                            "(moe_export::mixed_width_moe, ...) are built on first use; export with --pte-mode "
                            "xnnpack to run without them")


def compile_command(cxx: str, out: Path, et: Path | None = None) -> list[str]:
    et = et or _executorch_dir()
    inc = et / "include"
    return [
        cxx, "-O3", "-shared", "-fPIC", "-pthread", "-std=c++17", "-DNDEBUG",
        "-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED", "-DET_USE_THREADPOOL",
        f"-I{inc}", f"-I{inc / 'executorch/runtime/core/portable_type/c10'}", f"-I{_HERE}",
        str(SOURCES[0]), f"-L{et / 'lib'}", "-lexecutorch", "-lexecutorch_threadpool", f"-Wl,-rpath,{et / 'lib'}",
        "-o", str(out),
    ]


def _build_dir(cxx: str) -> Path:
    from executorch.version import __version__ as et_version

    from moe_export.paths import moe_export_home

    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(compile_command(cxx, Path("out"))).encode())
    h.update(et_version.encode())
    return moe_export_home() / "kernels" / f"et-{h.hexdigest()[:16]}"


def build() -> Path:
    """The library's path, compiling it first if this source/compiler/executorch has none yet."""
    from moe_export.io import atomic_path, waiting_lock

    missing = [str(s) for s in SOURCES if not s.is_file()]
    if missing:
        raise NativeKernelError(f"kernel sources missing from the installed package: {', '.join(missing)}")
    cxx = compiler()
    folder = _build_dir(cxx)
    lib = folder / LIB_NAME
    if lib.is_file():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    with waiting_lock(folder / ".lock"):
        if lib.is_file():  # another process built it while this one waited
            return lib
        with atomic_path(lib) as tmp:
            proc = subprocess.run(compile_command(cxx, tmp), capture_output=True, text=True)
            if proc.returncode != 0:
                (folder / "build.log").write_text(proc.stdout + proc.stderr)
                first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
                raise NativeKernelError(f"building the native .pte kernels failed ({first}); full log in "
                                        f"{folder / 'build.log'}")
    return lib


def load() -> ctypes.CDLL:
    """Build (if needed) and load the library into this process, once; the ExecuTorch runtime then has the
    ``moe_export::*.out`` kernels."""
    global _loaded
    with _lock:
        if _loaded is None:
            lib = build()
            try:
                _loaded = ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
            except OSError as err:
                raise NativeKernelError(f"{lib}: cannot be loaded ({err})") from None
            _loaded.moe_export_et_kernel_path.restype = ctypes.c_char_p
            _loaded.moe_export_et_serial_delegates.argtypes = [ctypes.c_int]
        return _loaded


def kernel_path() -> str:
    """The vector path the loaded kernels run (loads the library)."""
    return load().moe_export_et_kernel_path().decode()


@contextlib.contextmanager
def serial_delegates():
    """Delegates a program initialises inside (XNNPACK, at ``load_method``) on this thread take no threadpool and
    run on the calling thread; the ``moe_export`` kernels still split their rows over the runtime pool's thread
    count, on the library's own workers. At decode a native program's delegates are tiny ops, and on the runtime's
    pool each woke its worker, which then fought the kernels' workers for the cores (Mixtral slice, 2 threads,
    2-core VM: 321 tok/s with the delegates on the pool, 431 without; prefill 128 tokens 1039 tok/s without)."""
    lib = load()
    before = lib.moe_export_et_serial_delegates(1)
    try:
        yield
    finally:
        lib.moe_export_et_serial_delegates(before)
