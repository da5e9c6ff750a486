"""Streaming reads of safetensors tensors with ``pread`` into a reused buffer.

Planning touches every expert's first-layer weight once. Reading through safetensors' mmap maps
those pages into the process, so resident memory grows to every byte read (1.9 GB for two
Mixtral-8x7B layers) until the file is closed. ``pread`` into one buffer keeps resident memory at
the largest single read and costs one kernel copy per byte.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class StreamReader:
    """Byte-range reads of (slices of) tensors in a safetensors folder; nothing is memory-mapped."""

    def __init__(self, folder: str | os.PathLike):
        from moe_export.io import CheckpointError, SafetensorsCheckpoint

        self.folder = Path(folder)
        self.weight_map = SafetensorsCheckpoint(folder).weight_map
        self._headers: dict[str, tuple[int, dict]] = {}
        self._fds: dict[str, int] = {}
        self._bufs: dict[int, torch.Tensor] = {}
        self._error = CheckpointError

    def _header(self, file: str) -> tuple[int, dict]:
        if file not in self._headers:
            path = self.folder / file
            fd = os.open(path, os.O_RDONLY)
            self._fds[file] = fd
            (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            header = json.loads(os.pread(fd, n, 8))
            self._headers[file] = (8 + n, header)
        return self._headers[file]

    def info(self, key: str) -> tuple[torch.dtype, list[int], int]:
        """-> (dtype, shape, absolute byte offset of the tensor's data)."""
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: no tensor named {key!r}")
        base, header = self._header(self.weight_map[key])
        meta = header[key]
        return _DTYPES[meta["dtype"]], list(meta["shape"]), base + meta["data_offsets"][0]

    def read(self, key: str, expert: int | None = None, rows: tuple[int, int] | None = None, slot: int | None = None) -> torch.Tensor:
        """Tensor ``key``, or expert ``expert`` of a 3-D key, optionally only rows ``[r0, r1)``.

        ``slot=k`` returns a view into reused buffer k, overwritten by the next read into slot k
        (two slots let one expert be read while the previous one is scored).
        """
        dtype, shape, offset = self.info(key)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if expert is not None:
            offset += expert * _prod(shape[1:]) * itemsize
            shape = shape[1:]
        r0, r1 = rows if rows is not None else (0, shape[0])
        row_bytes = _prod(shape[1:]) * itemsize
        offset += r0 * row_bytes
        n = (r1 - r0) * row_bytes
        if slot is not None:
            if self._bufs.get(slot, torch.empty(0)).numel() < n:
                self._bufs[slot] = torch.empty(n, dtype=torch.uint8)
            out = self._bufs[slot][:n]
        else:
            out = torch.empty(n, dtype=torch.uint8)
        self._pread_into(self.weight_map[key], out, offset)
        return out.view(dtype).view([r1 - r0, *shape[1:]])

    def read_slice(self, s, slot: int | None = None) -> torch.Tensor:
        """A ``moe_export.models.TensorSlice``."""
        return self.read(s.key, s.expert, s.rows, slot)

    def _pread_into(self, file: str, out: torch.Tensor, offset: int) -> None:
        fd = self._fds[file]
        mv = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(mv):
            got = os.preadv(fd, [mv[done:]], offset + done)
            if got <= 0:
                raise self._error(f"{self.folder / file}: unexpected end of file; the checkpoint is truncated")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._headers.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def _prod(xs) -> int:
    p = 1
    for x in xs:
        p *= int(x)
    return p
