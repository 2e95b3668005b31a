"""The small helpers every layer shares: hashing, atomic writes, sorted-id lookup (numpy and the
standard library only, so the phone-side client can use them)."""

from __future__ import annotations

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
            # A directory cannot be replaced in one rename: move the old one aside first, so a
            # crash leaves either the old or the new directory at `final`, plus a stale temp dir.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
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
