"""Split the layers of one quantization run across torch.distributed ranks.

    torchrun --nproc-per-node 4 -m moe_export quantize MODEL_DIR --plan plan.json -o OUT

Each rank quantizes the units `assign` gives it and writes their shards; rank 0 writes the index
after a barrier. Which rank wrote a shard changes nothing in it, so the folder is byte-identical
to a single-process run. gloo on CPU, NCCL when CUDA is available (the barrier is the only
collective: shards go through the shared filesystem, not the network).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator


def assign(sizes: list[int], world_size: int) -> list[int]:
    """Rank of every unit: largest first onto the least-loaded rank (ties by rank), deterministic."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def process_group() -> Iterator[tuple[int, int, object]]:
    """(rank, world_size, barrier) from the torchrun environment; (0, 1, None) without one.

    Initialises the default group when needed and tears it down on exit.
    """
    if not launched_by_torchrun():
        yield 0, 1, None
        return
    import torch
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(seconds=float(os.environ.get("MOE_EXPORT_DIST_TIMEOUT", "1800")))
        dist.init_process_group(backend, timeout=timeout)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield dist.get_rank(), dist.get_world_size(), dist.barrier
    finally:
        if created:
            dist.destroy_process_group()
