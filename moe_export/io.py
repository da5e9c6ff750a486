"""Crash-safe writes and lazy reads of safetensors checkpoints.

Every artifact is written to a temporary file in the destination folder and renamed into place,
so an interrupted run never leaves a partial file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import torch


# errors that mean "this destination cannot take the file", as opposed to a bug or a bad source
_WRITE_ERRNOS = {errno.ENOSPC: "free space or write somewhere else", errno.EDQUOT: "free space or write somewhere else",
                 errno.EFBIG: "write somewhere else", errno.EROFS: "pick a writable output location",
                 errno.EACCES: "pick a writable output location or fix its permissions",
                 errno.EPERM: "pick a writable output location or fix its permissions"}


def _write_error(err: OSError, path: Path) -> OSError:
    # The error would otherwise name the temp file; name the artifact and say what to do.
    hint = _WRITE_ERRNOS.get(err.errno, "")
    return type(err)(err.errno, f"{err.strerror} while writing {path}" + (f"; {hint}" if hint else ""), str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _write_error(err, path) from None
    # mkstemp makes the file owner-only; an artifact should get the permissions any new file gets.
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
            raise _write_error(err, path) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; if the block succeeds, rename it onto ``path``: never a
    half-written folder under the final name. ``replace``: an existing ``path`` is replaced; otherwise it is
    kept (another process wrote the same content first).

    The folder and its files get the permissions any new file gets under the umask: ``mkdtemp`` makes the
    folder owner-only, and libraries that write through their own temp files (``save_pretrained``) leave
    those owner-only too, so a shared cache would be unreadable to its other users.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    except OSError as err:
        raise _write_error(err, path) from None
    try:
        yield tmp
        mask = _umask()
        for p in [tmp, *tmp.rglob("*")]:
            if not p.is_symlink():
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
        if replace and path.exists():
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            if replace or not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | os.PathLike, obj, **kwargs) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, **kwargs) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, truncated, corrupt or does not match what was asked for."""


def check_safetensors_file(path: str | os.PathLike) -> None:
    """Header and size checks that catch a missing, truncated or corrupt file before any tensor is read
    (a truncated file otherwise fails deep inside a read, or maps zeros). Reads only the header."""
    path = Path(path)
    fix = "re-create or re-download it"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint index lists it but the file is not there ({fix})")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header of {n} bytes in a {size}-byte "
                                  f"file); {fix}")
        try:
            header = json.loads(f.read(n))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err}); {fix}") from None
    want = 8 + n + max(ends, default=0)
    if size < want:
        raise CheckpointError(f"{path}: truncated: {size} bytes on disk, its header describes {want}; {fix}")


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
        try:  # names a truncated file as such; safetensors' own error does not
            check_safetensors_file(file)
        except CheckpointError as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(err).removeprefix(f'{file}: ')})") from None
        try:
            return safe_open(str(file), framework="pt")
        except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{file}: not a readable safetensors file ({err}); re-create or re-download it") from err

    def verify(self) -> None:
        """Check every file's header and size now (`check_safetensors_file`), before a long run starts."""
        for name in sorted(set(self.weight_map.values())):
            check_safetensors_file(self.folder / name)

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


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file crash-safely and byte-reproducibly.

    ``safetensors.torch.save_file`` keeps the header metadata in a hash map, so its key order (and the
    file's bytes) change from one process to the next; here metadata keys are sorted and tensors laid
    out by (descending item size, name), which also keeps every tensor aligned to its item size.
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    offset = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise TypeError(f"{path}: tensor {k!r} has dtype {t.dtype}, which safetensors cannot store")
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in order:
            t = tensors[k].detach().to("cpu").contiguous()
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class OutputFolderError(ValueError):
    """An output folder that a command must not write into: the source itself, another tool's files, or a
    folder another run is writing now."""


def check_output_folder(out: str | os.PathLike, sources=(), ours=None, partial: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, an output folder whose files a run would destroy or mix with its own.

    ``sources``: folders the run reads (the output may be none of them). An existing non-empty ``out`` is
    taken only when ``ours(out)`` says it is a finished output of the same command (replaced by this run) or
    when it holds only files matching ``partial`` (what an interrupted run of it leaves: resumed or replaced).
    """
    import fnmatch

    out = Path(out)
    for src in sources:
        if out.resolve() == Path(src).resolve():
            raise OutputFolderError(f"output {out} is the folder the model is read from; pass -o a different folder")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"output {out} exists and is not a folder; pass -o a new or empty folder")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if p.name != _LOCK_NAME)
    if not entries or (ours is not None and ours(out)):
        return
    foreign = [n for n in entries if not any(fnmatch.fnmatch(n, pat) for pat in partial)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputFolderError(f"output {out} is not empty and was not written by this command (it holds {shown}); "
                                "pass -o a new or empty folder")


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock file ``path`` (created if needed); a second holder waits. For builds that several processes
    may start at once (zoo models, the kernel library): the later ones wait, then find the work done."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_LOCK_NAME = ".moe_export.lock"


@contextlib.contextmanager
def output_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold ``out`` for this run: a second run on the same folder fails at once instead of mixing its files
    with this one's. The folder is created if needed and removed again if the run leaves nothing in it; the
    lock file is removed when the run ends."""
    import fcntl

    out = Path(out)
    lock = out / _LOCK_NAME
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(lock, "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                raise OutputFolderError(f"output {out} is being written by another moe-export run; wait for it to "
                                        "finish or pass -o another folder") from None
            try:
                if os.fstat(f.fileno()).st_ino == os.stat(lock).st_ino:
                    break  # the lock file still at the path: ours
            except FileNotFoundError:
                pass
            f.close()  # the run before us removed it after we opened it: lock the new one
    except OSError as err:
        raise _write_error(err, out) from None
    try:
        yield out
    finally:
        lock.unlink(missing_ok=True)
        f.close()  # releases the lock
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
