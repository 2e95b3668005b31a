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
    see the old directory or the new one, never a mix. `durable` also fsyncs (survives power loss).
    Plain `os` calls, one write per file: builds write thousands of bundles a second."""
    final = Path(final)
    parent, name = os.fspath(final.parent), final.name
    try:
        os.mkdir(parent)  # a new directory holds no leftovers
    except FileNotFoundError:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:
        # Leftovers of a killed writer (any pid) are never complete: clear them first.
        stale_prefix = f".{name}.tmp-"
        for entry in os.listdir(parent):
            if entry.startswith(stale_prefix):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    os.mkdir(tmp)
    try:
        for file_name, content in files.items():
            _write_new_file(os.path.join(tmp, file_name), content, durable)
        try:
            os.rename(tmp, final)  # atomic; fails when `final` is a non-empty directory
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # One atomic exchange: `final` is never missing (a later writer clears the old copy).
            exchange_paths(Path(tmp), final)
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_new_file(path: str, content: bytes, durable: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(content)
        while view:  # os.write may write less than asked (signals, some filesystems)
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def sorted_lookup(sorted_ids, query) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each query id in an ascending id array, by binary search."""
    ids = np.asarray(sorted_ids, dtype=np.int64)
    query = np.asarray(query, dtype=np.int64).reshape(-1)
    if not len(ids):
        return np.zeros(len(query), np.int64), np.zeros(len(query), bool)
    pos = np.searchsorted(ids, query)
    found = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == query)
    return pos, found
