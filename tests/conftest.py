import os

import pytest
import torch

# One thread is faster than two on a loaded 2-core machine, and keeps results deterministic.
torch.set_num_threads(int(os.environ.get("MOE_EXPORT_TEST_THREADS", "1")))

# Triton has no CPU backend: without CUDA its kernels run only in the interpreter, which Triton picks when
# it is first imported (torchao imports it), so this must be set before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
