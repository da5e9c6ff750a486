import os

import pytest
import torch

# One thread is faster than two on a loaded 2-core machine, and keeps results deterministic.
torch.set_num_threads(int(os.environ.get("MOE_EXPORT_TEST_THREADS", "1")))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
