"""Where bundles live: paths, atomic bundle writes, up-to-date checks and the `bundles.jsonl` index."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from sdk_builder.formats import MANIFEST, BundleError
from sdk_builder.util import atomic_write_bytes, atomic_write_dir, sha256_bytes, sha256_file

INDEX = "bundles.jsonl"
_SAFE_USER_ID = re.compile(r"[0-9]{1,19}", re.ASCII)  # ASCII digits only: "²".isdigit() is True
_MAX_USER_ID = 2**63 - 1  # ids are int64 everywhere (event logs, checkpoints, the bundle program)


def parse_user_id(text: str) -> int:
    """User ids name bundle directories: only plain non-negative int64 integers are accepted."""
    if not _SAFE_USER_ID.fullmatch(str(text)) or int(text) > _MAX_USER_ID:
        raise BundleError(f"user id {text!r} is not a non-negative 64-bit integer (bundle directories are named by user id)")
    return int(text)


def bundle_path(out_root: Path, user_id: int) -> Path:
    """<out>/<h0h1>/<h2h3>/<user_id>: 65,536 fan-out directories keep millions of bundles listable."""
    digest = sha256_bytes(str(user_id).encode())
    return Path(out_root) / digest[:2] / digest[2:4] / str(user_id)


def write_bundle_atomically(final: Path, files: dict[str, bytes], *, durable: bool = False) -> Path:
    """Write the bundle `files` into the directory `final`: readers, and a process killed at any
    point, see the old bundle or the new one, never a mix. `durable` also fsyncs."""
    return atomic_write_dir(final, files, durable=durable)


def is_current(path: Path, build_key: str) -> bool:
    """A bundle at `path` built from the same inputs (its manifest's `build_key`), with all its files."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("build_key") == build_key and all((path / f).is_file() for f in manifest.get("files", {}))


def check_output(out: Path, n_bundles: int, bytes_per_bundle: int) -> None:
    """Fail before building anything when the output cannot take the bundles."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise BundleError(f"{out}: not writable ({exc.strerror})") from None
    free = shutil.disk_usage(out).free
    needed = int(n_bundles * bytes_per_bundle * 1.2)
    if free < needed:
        raise BundleError(f"{out}: {free / 1e6:,.0f} MB free, {n_bundles:,} bundles need about {needed / 1e6:,.0f} MB")


def write_index(out: Path, rows: list[dict], checkpoint_sha256: str) -> Path:
    """Merge this run's bundles into `bundles.jsonl` (one line per user, sorted), atomically."""
    index = out / INDEX
    entries: dict[int, dict] = {}
    if index.exists():
        for line in index.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                entries[int(entry["user_id"])] = entry
    for r in rows:
        if r["skipped"] and r["user_id"] in entries:
            continue
        manifest_sha = r["manifest_sha256"] or sha256_file(out / r["path"] / MANIFEST)
        entries[r["user_id"]] = {"user_id": r["user_id"], "path": r["path"], "manifest_sha256": manifest_sha,
                                 "checkpoint_sha256": checkpoint_sha256}
    text = "".join(json.dumps(entries[u], sort_keys=True) + "\n" for u in sorted(entries))
    return atomic_write_bytes(index, text.encode())
