"""Bundle patches: old bundle + patch = new bundle, byte for byte (`build --delta-from`, `verify --patch`).

A rebuilt bundle differs from the old one where the user's shard changed, but `items.ids` are sorted,
so one inserted item shifts every later row of the stamped tables (and the manifest's id list). Ops
that copy runs of the old file (found through an index of its 8-byte windows, wherever they moved)
and insert the rest literally handle shifts; DEFLATE then squeezes the literals and op headers.
The format (docs/bundle-format.md, Patches): the `formats.BundlePatch` header as one JSON line,
then the raw DEFLATE of every new file's ops, in the header's order.

A build that knows the user's previous bundle (`PreviousBundles`) also keeps most of its shard
(hysteresis, `sdk_builder.shard`) and the slots of the items it keeps (`Shard.item_slot`): each
item new to the shard costs its table rows as literal bytes, and no other item's rows move.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from sdk_builder.formats import (
    MANIFEST, PATCH_COPY, PATCH_FORMAT_VERSION, PATCH_INSERT, PATCH_SUFFIX, PROGRAM, SIGNATURE, BundleError, BundlePatch,
    PatchFile, decode_ids, validation_message,
)
from sdk_builder.bundle.store import bundle_path
from sdk_builder.util import atomic_write_bytes, atomic_write_dir, sha256_bytes

WINDOW = 8  # bytes hashed per index entry: one float32 pair, one int8 half-row
MIN_COPY = 16  # a copy op costs 9 bytes before DEFLATE; shorter matches stay literal
_U32 = struct.Struct("<I")
_COPY = struct.Struct("<BII")
_MAX_U32 = 2**32 - 1


def patch_path(new_bundle: Path) -> Path:
    """Where `build --delta-from` writes the patch of `new_bundle`: `<dir>.patch` beside it."""
    new_bundle = Path(new_bundle)
    return new_bundle.with_name(new_bundle.name + PATCH_SUFFIX)


def bundle_files(path: Path) -> dict[str, bytes]:
    """The files that make a bundle: manifest.json, every file it lists and the signature if present."""
    path = Path(path)
    try:
        manifest_bytes = (path / MANIFEST).read_bytes()
    except OSError as exc:
        raise BundleError(f"{path / MANIFEST}: {exc.strerror or exc}") from None
    try:
        listed = json.loads(manifest_bytes)["files"]
        names = sorted(listed)
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{path / MANIFEST}: not a bundle manifest (no files map)") from None
    files = {MANIFEST: manifest_bytes}
    for name in names + ([SIGNATURE] if (path / SIGNATURE).is_file() else []):
        if "/" in name or name.startswith("."):
            raise BundleError(f"{path / MANIFEST}: files: {name!r} is not a plain file name")
        try:
            files[name] = (path / name).read_bytes()
        except OSError as exc:
            raise BundleError(f"{path / name}: {exc.strerror or exc}") from None
    return files


@dataclass(frozen=True)
class PreviousManifest:
    """What a rebuild reads of a user's previous bundle."""

    path: Path
    item_ids: list[int]
    manifest_sha256: str
    checkpoint_sha256: str
    recipe: str

    def program_bytes(self) -> bytes:
        try:
            return (self.path / PROGRAM).read_bytes()
        except OSError as exc:
            raise BundleError(f"{self.path / PROGRAM}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class PreviousBundles:
    """Where a build finds each user's previous bundle: one user's bundle directory
    (`build --delta-from`) or an earlier build's --out (`--delta-from-dir`)."""

    bundle: Path | None = None
    root: Path | None = None

    def shard_of(self, user_id: int) -> PreviousManifest | None:
        """The user's previous bundle; None when the user has none. A bundle of another user is
        refused: its shard comes from that user's history."""
        path = self.bundle if self.bundle is not None else bundle_path(self.root, user_id) if self.root else None
        if path is None or (self.bundle is None and not (path / MANIFEST).is_file()):
            return None
        try:
            data = (path / MANIFEST).read_bytes()
        except OSError as exc:
            raise BundleError(f"{path / MANIFEST}: {exc.strerror or exc}") from None
        try:
            manifest = json.loads(data)
            owner, encoded = manifest["user_id"], manifest["items"]["ids"]
            checkpoint, recipe = str(manifest["checkpoint_sha256"]), str(manifest["recipe"])
        except (ValueError, KeyError, TypeError):
            raise BundleError(f"{path / MANIFEST}: not a bundle manifest (no user_id, items.ids, "
                              "checkpoint_sha256 or recipe)") from None
        try:
            ids = previous_ids(encoded)
        except (ValueError, TypeError) as exc:
            raise BundleError(f"{path / MANIFEST}: items.ids: {exc}") from None
        if owner != user_id:
            raise BundleError(f"{path / MANIFEST}: user_id {owner}, not the user {user_id} being built")
        return PreviousManifest(path, ids, sha256_bytes(data), checkpoint, recipe)


def previous_ids(ids: str | list) -> list[int]:
    """A previous bundle's item ids: encoded (format_version 3), or a JSON list (2), so that the first
    build in the new format still keeps most of the user's shard."""
    return decode_ids(ids) if isinstance(ids, str) else [int(i) for i in ids]


def _common_prefix(a: bytes, i: int, b: bytes, j: int) -> int:
    """Length of the longest run a[i:] and b[j:] share, by galloping slice comparisons (C speed)."""
    limit = min(len(a) - i, len(b) - j)
    length, step = 0, 64
    while length < limit:
        k = min(step, limit - length)
        if a[i + length : i + length + k] == b[j + length : j + length + k]:
            length += k
            step *= 2
            continue
        if k == 1:
            break
        step = max(1, k // 2)
    return length


def diff_ops(old: bytes, new: bytes) -> bytes:
    """The op stream rebuilding `new` from `old`: greedy longest copies, literals in between."""
    index: dict[bytes, int] = {}
    for i in range(len(old) - WINDOW, -1, -1):  # backwards: the first occurrence of a window wins
        index[old[i : i + WINDOW]] = i
    out = bytearray()
    literal_start = j = 0
    next_old = 0  # where the old file continues after the last copy: the likeliest next match

    def emit_literal(end: int) -> None:
        for start in range(literal_start, end, _MAX_U32):
            chunk = new[start : min(end, start + _MAX_U32)]
            out.append(PATCH_INSERT)
            out.extend(_U32.pack(len(chunk)))
            out.extend(chunk)

    while j + WINDOW <= len(new):
        window = new[j : j + WINDOW]
        i = next_old if old[next_old : next_old + WINDOW] == window else index.get(window)
        if i is None:
            j += 1
            continue
        length = _common_prefix(old, i, new, j)
        back = 0  # grow the match backwards into the pending literal
        while back < j - literal_start and back < i and old[i - back - 1] == new[j - back - 1]:
            back += 1
        if length + back < MIN_COPY:
            j += 1
            continue
        i, j, length = i - back, j - back, length + back
        emit_literal(j)
        out.extend(_COPY.pack(PATCH_COPY, i, length))
        j += length
        literal_start, next_old = j, i + length
    emit_literal(len(new))
    return bytes(out)


def make_patch(old: Path, new: Path) -> bytes:
    """The patch turning bundle directory `old` into bundle directory `new`."""
    old_files, new_files = bundle_files(old), bundle_files(new)
    covered = {MANIFEST, *json.loads(new_files[MANIFEST])["files"]}
    ops = b"".join(diff_ops(old_files.get(name, b""), data) for name, data in new_files.items())
    header = BundlePatch(old_manifest_sha256=sha256_bytes(old_files[MANIFEST]),
                         new_manifest_sha256=sha256_bytes(new_files[MANIFEST]), ops_size=len(ops),
                         files=[PatchFile(name=name, size=len(data),
                                          sha256=None if name in covered else sha256_bytes(data))
                                for name, data in new_files.items()])
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    return header.to_json().encode() + deflate.compress(ops) + deflate.flush()


def write_patch(old: Path, new: Path, *, durable: bool = False) -> Path:
    """Write `<new>.patch` (atomically) turning bundle `old` into bundle `new`."""
    return atomic_write_bytes(patch_path(new), make_patch(old, new), durable=durable)


def read_header(patch: bytes, source: str) -> tuple[BundlePatch, bytes]:
    """(header, compressed op stream) of a patch file's bytes."""
    end = patch.find(b"\n")
    if end < 0:
        raise BundleError(f"{source}: not a bundle patch (no header line)")
    try:
        header = BundlePatch.model_validate_json(patch[:end])
    except ValidationError as exc:
        raise BundleError(validation_message(f"{source}: header", exc)) from None
    if header.patch_format_version != PATCH_FORMAT_VERSION:
        raise BundleError(f"{source}: patch_format_version {header.patch_format_version}; "
                          f"this SDK reads {PATCH_FORMAT_VERSION}")
    return header, patch[end + 1 :]


def _inflate(body: bytes, size: int, source: str) -> bytes:
    inflater = zlib.decompressobj(-15)
    try:
        ops = inflater.decompress(body, size + 1)  # never more than the header announced (+1 to notice)
    except zlib.error as exc:
        raise BundleError(f"{source}: op stream is not valid DEFLATE ({exc})") from None
    if len(ops) != size or not inflater.eof:
        raise BundleError(f"{source}: op stream inflates to {'more' if len(ops) > size else 'fewer'} bytes than "
                          f"the header's ops_size {size}")
    if inflater.unused_data:
        raise BundleError(f"{source}: {len(inflater.unused_data)} bytes after the end of the op stream")
    return ops


def apply_patch(old_files: dict[str, bytes], patch: bytes, source: str) -> dict[str, bytes]:
    """The new bundle's files, every one checked: its size against the header's; manifest.json
    against new_manifest_sha256, the files it lists against their sha256 there, any other file
    (the signature) against the header's sha256. Raises BundleError (one line) on any mismatch."""
    header, body = read_header(patch, source)
    have = sha256_bytes(old_files.get(MANIFEST, b""))
    if have != header.old_manifest_sha256:
        raise BundleError(f"{source}: made for the bundle whose manifest sha256 is {header.old_manifest_sha256[:16]}..., "
                          f"not this one ({have[:16]}...)")
    ops = _inflate(body, header.ops_size, source)
    pos, out = 0, {}
    try:
        for entry in header.files:
            if entry.name in out:
                raise BundleError(f"{source}: files: {entry.name} is listed twice")
            old, data = old_files.get(entry.name, b""), bytearray()
            while len(data) < entry.size:
                op = ops[pos]
                if op == PATCH_COPY:
                    _, offset, length = _COPY.unpack_from(ops, pos)
                    pos += _COPY.size
                    if offset + length > len(old):
                        raise BundleError(f"{source}: {entry.name}: copy of bytes {offset}..{offset + length} "
                                          f"beyond the old file's {len(old)}")
                    data += old[offset : offset + length]
                elif op == PATCH_INSERT:
                    (length,) = _U32.unpack_from(ops, pos + 1)
                    pos += 1 + _U32.size
                    if pos + length > len(ops):
                        raise BundleError(f"{source}: {entry.name}: literal runs past the end of the op stream")
                    data += ops[pos : pos + length]
                    pos += length
                else:
                    raise BundleError(f"{source}: {entry.name}: unknown op {op} at op stream byte {pos}")
            if len(data) != entry.size or (entry.sha256 is not None and sha256_bytes(data) != entry.sha256):
                raise BundleError(f"{source}: {entry.name}: rebuilt file differs from the header's size/sha256")
            out[entry.name] = bytes(data)
    except (IndexError, struct.error):
        raise BundleError(f"{source}: op stream ends inside an op") from None
    if pos != len(ops):
        raise BundleError(f"{source}: {len(ops) - pos} op stream bytes left after the last file")
    if sha256_bytes(out.get(MANIFEST, b"")) != header.new_manifest_sha256:
        raise BundleError(f"{source}: rebuilt manifest.json differs from new_manifest_sha256")
    try:
        listed = dict(json.loads(out[MANIFEST])["files"])
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{source}: the rebuilt manifest.json is not a bundle manifest (no files map)") from None
    wrong = [name for name, digest in listed.items() if name not in out or sha256_bytes(out[name]) != digest]
    if wrong:
        raise BundleError(f"{source}: {wrong[0]}: missing or not the sha256 the new manifest lists")
    unchecked = [e.name for e in header.files if e.sha256 is None and e.name != MANIFEST and e.name not in listed]
    if unchecked:
        raise BundleError(f"{source}: {unchecked[0]}: no sha256 in the header and not listed in the new manifest")
    return out


def patch_bundle(old: Path, patch: Path, out: Path | None = None, *, durable: bool = False) -> Path:
    """Apply `patch` to bundle `old`, writing the new bundle to `out` (default: in place of `old`)
    atomically: checked in memory first, so a bad patch leaves every directory as it was."""
    try:
        data = Path(patch).read_bytes()
    except OSError as exc:
        raise BundleError(f"{patch}: {exc.strerror or exc}") from None
    files = apply_patch(bundle_files(old), data, str(patch))
    return atomic_write_dir(Path(out or old), files, durable=durable)


def check_patch(new: Path, patch: Path, old: Path) -> dict:
    """`verify NEW --patch P --old OLD`: old + patch must equal new, byte for byte, file for file."""
    try:
        data = Path(patch).read_bytes()
    except OSError as exc:
        raise BundleError(f"{patch}: {exc.strerror or exc}") from None
    rebuilt, expected = apply_patch(bundle_files(old), data, str(patch)), bundle_files(new)
    if set(rebuilt) != set(expected):
        raise BundleError(f"{patch}: rebuilds files {sorted(rebuilt)}, but {new} holds {sorted(expected)}")
    differing = [name for name in expected if rebuilt[name] != expected[name]]
    if differing:
        raise BundleError(f"{patch}: {old} + patch differs from {new / differing[0]}")
    return {"patch": str(patch), "old": str(old), "ok": True, "patch_bytes": len(data),
            "new_bytes": sum(len(v) for v in expected.values()), "files": len(expected)}
