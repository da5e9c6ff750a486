"""Crash-safe writes and lazy reads of safetensors checkpoints.

Every artifact is written to a temporary file in the destination folder and renamed into place,
so an interrupted run never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj, **kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, **kwargs) + "\n")


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, truncated, corrupt or does not match what was asked for."""


class SafetensorsCheckpoint:
    """Lazy, memory-mapped access to the tensors of a (possibly sharded) safetensors checkpoint.

    Nothing is read until a tensor is asked for, and then only that tensor's bytes.
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.folder}: no *.safetensors file found")
            weight_map = {}
            for f in files:
                for key in self._open(safe_open, f).keys():
                    weight_map[key] = f.name
        self.weight_map: dict[str, str] = weight_map
        self._handles: dict[str, object] = {}
        self._safe_open = safe_open

    @staticmethod
    def _open(safe_open, file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({err}); re-create or re-download it") from err

    def release(self) -> None:
        """Close the open files. Pages read through a file's memory map stay resident (and count in
        RSS) while it is open, so a reader that walks a checkpoint layer by layer releases between layers."""
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def _handle(self, key: str):
        if key not in self.weight_map:
            raise KeyError(f"{self.folder}: no tensor named {key!r}")
        name = self.weight_map[key]
        if name not in self._handles:
            self._handles[name] = self._open(self._safe_open, self.folder / name)
        return self._handles[name]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except (KeyError, CheckpointError):
            raise
        except Exception as err:
            raise CheckpointError(f"{self.folder}: tensor {key!r} cannot be read ({err}); the file may be truncated") from err

    def shape(self, key: str) -> list[int]:
        return list(self._handle(key).get_slice(key).get_shape())

    def config(self) -> dict:
        cfg = self.folder / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"{self.folder}: no config.json")
        return json.loads(cfg.read_text())
