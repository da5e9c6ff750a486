import os

import pytest
import torch

# One thread is faster than two on a loaded 2-core machine, and keeps results deterministic.
torch.set_num_threads(int(os.environ.get("MOE_EXPORT_TEST_THREADS", "1")))

# Inference defaults to the int8-activation arithmetic (moe_export/kernels/cpu_ops.py); the suite's parity tests compare the
# exact arithmetic with dequantized references, so the suite runs exact unless told otherwise (subprocesses
# inherit it). The int8 arithmetic and the default itself have their own tests (test_kernels_int8.py,
# test_accuracy_default.py).
os.environ.setdefault("MOE_EXPORT_ACCURACY", "exact")

# Triton has no CPU backend: without CUDA its kernels run only in the interpreter, which Triton picks when
# it is first imported (torchao imports it), so this must be set before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_zoo_dir():
    """The `tiny` zoo build (Mixtral, pre-trained + fine-tuned), built once into $MOE_EXPORT_HOME and reused.

    Folder with pretrained/, finetuned/ (save_pretrained + tokenizer) and manifest.json. The first build
    takes 1-4 minutes on 2 cores; concurrent sessions wait on a lock instead of building twice.
    """
    from moe_export.zoo import build

    return build("tiny", seed=0, progress=False)
