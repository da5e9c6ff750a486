"""Known, harmless output of the libraries we call, kept out of the user's terminal around our calls only.

Each filter names the library, the exact message and why it says nothing about the user's run. None is
installed at import time or process-wide: a warning this project has not looked at still reaches the user,
and code that calls the libraries directly sees them unchanged.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import warnings
from typing import Iterator

# torch.export and ExecuTorch deep-copy exported programs; copying a pytree spec re-creates its LeafSpec
# objects, a class torch marks deprecated with a FutureWarning at construction (warned from copyreg, the
# frame that constructs the copy). The deprecation is about code that tests `isinstance(spec, LeafSpec)`,
# which this project never does; torch's own copy is what triggers it, once per copied spec.
_LEAF_SPEC = r"`isinstance\(treespec, LeafSpec\)` is deprecated"

# torch.onnx names each dynamic dim after its torch.export.Dim; two inputs sharing one Dim (an encoder-decoder step's
# cross-attention keys and values share the source length Te) make it say, once per shared use, that it keeps the
# first name: the graph's inputs still carry the one symbolic dim "Te".
_SHARED_DIM = r"# The axis name: .* will not be used, since it shares the same shape constraints with another axis"

# ExecuTorch's emitter warns that a buffer the program mutates starts with a meaningless value (only its shape and
# dtype are stored). The native .pte's KV cache buffers (``export.wrapper.StatefulStep``) are such buffers by design:
# a slot is read only after the sequence has written it (the causal mask gives the others weight 0).
_MUTABLE_BUFFER = r"Mutation on a buffer in the model is detected"

# ExecuTorch's threadpool sizes itself from the CPU model on its first run and logs (C++, straight to
# file descriptor 2) each /sys file it tries: an x86 machine has no ARM MIDR file and no soc0 image, so
# every run on x86 prints these five lines. The pool still gets the cores the OS reports. Resizing the pool
# (``export.runners.executorch_threads``, asked for by the caller) logs that it did.
_EXECUTORCH_CPUINFO = re.compile(rb"^\[(cpuinfo_utils\.cpp:\d+\] |threadpool\.cpp:\d+\] Resetting threadpool to \d+ threads)")


@contextlib.contextmanager
def exporting() -> Iterator[None]:
    """Around ``torch.export`` / ``torch.onnx.export`` / ExecuTorch lowering: the LeafSpec FutureWarning, the ONNX
    exporter's note on a shared dynamic dim's name and ExecuTorch's note on mutable buffers' initial values only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LEAF_SPEC, category=FutureWarning, module=r"copyreg|torch\.")
        warnings.filterwarnings("ignore", message=_SHARED_DIM, category=UserWarning, module=r"torch\.onnx\.")
        warnings.filterwarnings("ignore", message=_MUTABLE_BUFFER, category=UserWarning, module=r"executorch\.")
        yield


@contextlib.contextmanager
def executorch_first_run() -> Iterator[None]:
    """Around the first ExecuTorch method execution of a process, and around loading a method (an XNNPACK
    delegate starts the threadpool there): drop the runtime's CPU-probe log lines
    (``_EXECUTORCH_CPUINFO``); everything else it writes to stderr is passed on unchanged afterwards."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not _EXECUTORCH_CPUINFO.match(line)]
            if kept:
                os.write(2, b"".join(kept))


@contextlib.contextmanager
def transformers_saving() -> Iterator[None]:
    """Around ``save_pretrained``: no "Writing model shards" bar per save between this project's own bars
    (a save of the folders written here is one shard and a fraction of a second; the caller reports it)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()
