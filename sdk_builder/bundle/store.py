"""Where bundles live: paths, atomic bundle writes, up-to-date checks and the `bundles.jsonl` index."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import os
import shutil
from pathlib import Path

from sdk_builder.formats import BUILD_CACHE, MANIFEST, SIGNATURE, BundleError, parse_int64_text
from sdk_builder.util import atomic_write_bytes, atomic_write_dir, sha256_bytes, sha256_file

INDEX = "bundles.jsonl"
MIN_KEY_BYTES = 32  # HMAC-SHA256 keys shorter than the hash add no strength; refuse them


def parse_user_id(text: str) -> int:
    """User ids name bundle directories: only plain non-negative int64 integers are accepted."""
    user_id = parse_int64_text(str(text))
    if user_id is None:
        raise BundleError(f"user id {text!r} is not a non-negative 64-bit integer (bundle directories are named by user id)")
    return user_id


def user_ids_path(checkpoint: Path) -> Path:
    """The checkpoint's user ids as .npy, named by the checkpoint file's size and mtime: a replaced
    checkpoint never matches an old map."""
    st = checkpoint.stat()
    return checkpoint.parent / BUILD_CACHE / f"user-ids-{st.st_size}-{st.st_mtime_ns}.npy"


def cached_unknown_user_ids(checkpoint: Path, user_ids: list[int]) -> list[int] | None:
    """The ids (deduplicated, in order) missing from the checkpoint's cached id map, read without
    torch so `build` reports unknown ids at once; None when no current map is cached."""
    import numpy as np

    try:
        known = np.load(user_ids_path(checkpoint), allow_pickle=False)
    except (OSError, ValueError):
        return None
    requested = list(dict.fromkeys(user_ids))
    found = np.isin(np.asarray(requested, dtype=np.int64), known)
    return [u for u, ok in zip(requested, found) if not ok]


def unknown_users_message(unknown: list[int]) -> str:
    shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
    return f"{len(unknown)} unknown user id(s): {shown} (pass --skip-unknown to build the others)"


def bundle_path(out_root: Path, user_id: int) -> Path:
    """<out>/<h0h1>/<h2h3>/<user_id>: 65,536 fan-out directories keep millions of bundles listable."""
    digest = sha256_bytes(str(user_id).encode())
    return Path(out_root) / digest[:2] / digest[2:4] / str(user_id)


COLD_START_DIR = "cold_start"  # beside the fan-out directories (two hex digits: no clash)


def cold_start_path(out_root: Path) -> Path:
    """<out>/cold_start: the bundle for users without one of their own (`build --new-user`)."""
    return Path(out_root) / COLD_START_DIR


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
        noun = "bundle needs" if n_bundles == 1 else "bundles need"
        raise BundleError(f"{out}: {format_bytes(free)} free, {n_bundles:,} {noun} about {format_bytes(needed)}")


def format_bytes(n: int) -> str:
    """1 significant unit: 0 B, 512 B, 240 KB, 3.1 MB, 12 GB (decimal units, as `df -H`)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            value = n / size
            return f"{value:,.1f} {unit}" if value < 10 else f"{value:,.0f} {unit}"
    return f"{n:,} B"


def write_index(out: Path, rows: list[dict], checkpoint_sha256: str) -> Path:
    """Merge this run's bundles into `bundles.jsonl` (one line per user, sorted), atomically."""
    index = out / INDEX
    entries: dict[int | None, dict] = {}  # None: the cold-start bundle (listed first)
    if index.exists():
        for line in index.read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                entries[None if entry["user_id"] is None else int(entry["user_id"])] = entry
    for r in rows:
        if r["skipped"] and r["user_id"] in entries:
            continue
        manifest_sha = r["manifest_sha256"] or sha256_file(out / r["path"] / MANIFEST)
        entries[r["user_id"]] = {"user_id": r["user_id"], "path": r["path"], "manifest_sha256": manifest_sha,
                                 "checkpoint_sha256": checkpoint_sha256,
                                 **({"kind": "cold_start"} if r["user_id"] is None else {})}
    order = sorted(entries, key=lambda u: (u is not None, u or 0))
    text = "".join(json.dumps(entries[u], sort_keys=True) + "\n" for u in order)
    try:
        return atomic_write_bytes(index, text.encode())
    except OSError as exc:
        for stale in out.glob(f".{INDEX}.tmp-{os.getpid()}"):
            stale.unlink(missing_ok=True)
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or type(exc).__name__)
        raise BundleError(f"{index}: not written ({reason}); the {len(rows):,} bundle(s) of this run are written "
                          f"and complete, rerun the build to write the index") from None


def read_sign_key(path: Path) -> bytes:
    """An HMAC key file: its bytes exactly (apps embed the same bytes)."""
    try:
        key = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path}: cannot read the key ({exc.strerror})") from None
    if len(key) < MIN_KEY_BYTES:
        raise BundleError(f"{path}: {len(key)} bytes; a signing key needs at least {MIN_KEY_BYTES} random bytes "
                          f"(e.g. head -c 32 /dev/urandom > {Path(path).name})")
    return key


def manifest_signature(key: bytes, manifest: bytes) -> str:
    """HMAC-SHA256 of manifest.json's exact bytes, lowercase hex: what `manifest.json.hmac` holds."""
    return hmac.new(key, manifest, hashlib.sha256).hexdigest()


def sign_bundle(path: Path, key: bytes, *, durable: bool = False) -> Path:
    """Write `manifest.json.hmac` beside the manifest. The manifest lists every other file's
    sha256, so the signature covers the whole bundle."""
    signature = manifest_signature(key, (Path(path) / MANIFEST).read_bytes())
    return atomic_write_bytes(Path(path) / SIGNATURE, (signature + "\n").encode(), durable=durable)
