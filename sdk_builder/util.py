"""The small helpers every layer shares: hashing, atomic writes, sorted-id lookup (numpy and the
standard library only, so the phone-side client can use them)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    """Streamed: a checkpoint can be hundreds of MB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> Path:
    """Write `path` through a temporary file and a rename: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> None:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE), so `b` is never
    missing. Elsewhere two renames: a crash between them leaves `b` missing, its old content at `a`."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is not None:
        renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # else: no kernel/filesystem support
            raise OSError(err, os.strerror(err), str(b))
    aside = b.with_name(f".{b.name}.swap-{os.getpid()}")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def atomic_write_dir(final: Path, files: dict[str, bytes], *, durable: bool = False) -> Path:
    """Write `files` into the directory `final` so that readers, and a process killed at any point,
    see the old directory or the new one, never a mix. `durable` also fsyncs (survives power loss)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed writer (any pid) are never complete: clear them first.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as f:
                f.write(content)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
        if final.exists():
            # One atomic exchange: `final` is never missing (a later writer clears the old copy).
            exchange_paths(tmp, final)
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def sorted_lookup(sorted_ids, query) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each query id in an ascending id array, by binary search."""
    ids = np.asarray(sorted_ids, dtype=np.int64)
    query = np.asarray(query, dtype=np.int64).reshape(-1)
    if not len(ids):
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    pos = np.searchsorted(ids, query)
    found = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == query)
    return pos, found
