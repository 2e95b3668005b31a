"""`tbsm-sdk verify`: hashes, manifest, schema and golden vectors replayed in the ExecuTorch runtime.

What binds a bundle together (a bundle that passes has all of these):
- `manifest.json` lists the sha256 of `model.pte`, `events.schema.json` and `golden.json` by plain
  file name; nothing else may sit in the bundle directory except the optional signature;
- the program's input shapes are the manifest's `program.max_history` / `max_candidates`;
- `golden.json`'s histories are all for the manifest's `user_id` (null, synthetic histories, in a
  cold-start bundle), and its scores, computed by the
  eager full model at build time, replay in the program within tolerance: the scores depend on
  the user's embedding row and on the local rows the manifest's `items.ids` give the candidates,
  so another user's program or a reordered id list fails here;
- `items.ids` has at most `shard_policy.shard_size` ids (the program's item table holds
  shard_size + 2 rows) and exactly as many as the shard policy's sources contributed;
- with `--index bundles.jsonl`: the manifest's sha256 is the one recorded when it was built, and
  with `--key`: `manifest.json.hmac` is the manifest's HMAC-SHA256 under that key. Either makes
  any edit of the manifest (user id, ids, file hashes) and so of any file evident.
"""

from __future__ import annotations

import functools
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from sdk_builder.bundle.store import INDEX, manifest_signature
from sdk_builder.client import Bundle, encode, golden_max_diff, refresh_max_diff
from sdk_builder.formats import GOLDEN, MANIFEST, PROGRAM, SCHEMA, SIGNATURE, BundleError, compact_json, events_json_schema
from sdk_builder.util import sha256_bytes, sha256_file


@dataclass(frozen=True)
class Expected:
    """What a bundle must match from outside itself: its index entry, the app's signing key."""

    manifest_sha256: str | None = None
    user_id: int | None = None
    key: bytes | None = None
    index: str = INDEX
    cold_start: bool = False  # the index lists the cold-start bundle here


@functools.cache
def _own_schema_sha256() -> str:
    return sha256_bytes(compact_json(events_json_schema()).encode())


def _schema_validator(path: Path, sha256: str):
    """None for this SDK's own schema (byte for byte): it is generated from the pydantic models
    that already parsed every golden history, so jsonschema could only agree (a test checks that
    it does); that skips ~80% of verify's time. Any other schema is checked with jsonschema."""
    if sha256 == _own_schema_sha256():
        return None
    return _foreign_schema_validator(path.read_bytes(), str(path))


@functools.lru_cache(maxsize=8)
def _foreign_schema_validator(data: bytes, source: str):
    from jsonschema import Draft202012Validator  # only verify needs it: kept off the import path of rank

    try:
        schema = json.loads(data)
        Draft202012Validator.check_schema(schema)
    except Exception as exc:
        raise BundleError(f"{source}: not a valid JSON Schema ({type(exc).__name__})") from None
    return Draft202012Validator(schema)


def _check_directory(bundle: Bundle) -> None:
    m = bundle.manifest
    missing = {PROGRAM, SCHEMA, GOLDEN, *([m.refresh.file] if m.refresh is not None else [])} - set(m.files)
    if missing:
        raise BundleError(f"{bundle.path / MANIFEST}: files: {sorted(missing)} not listed")
    allowed = set(m.files) | {MANIFEST, SIGNATURE}
    extra = sorted(p.name for p in bundle.path.iterdir() if p.name not in allowed)
    if extra:
        raise BundleError(f"{bundle.path}: unexpected file(s) not listed in the manifest: {', '.join(extra[:5])}"
                          + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))


def _check_outside(bundle: Bundle, expected: Expected) -> None:
    manifest = bundle.path / MANIFEST
    if expected.cold_start and bundle.manifest.kind != "cold_start":
        raise BundleError(f"{manifest}: kind {bundle.manifest.kind!r} but {expected.index} lists the cold-start bundle here")
    if expected.user_id is not None and expected.user_id != bundle.manifest.user_id:
        raise BundleError(f"{manifest}: user_id {bundle.manifest.user_id} but {expected.index} lists this bundle "
                          f"for user {expected.user_id}")
    if expected.manifest_sha256 is not None and sha256_file(manifest) != expected.manifest_sha256:
        raise BundleError(f"{manifest}: sha256 differs from the one {expected.index} recorded at build time "
                          f"(the manifest was modified)")
    if expected.key is not None:
        signature = bundle.path / SIGNATURE
        if not signature.is_file():
            raise BundleError(f"{signature}: missing (the bundle is not signed; build it with --sign-key)")
        got = signature.read_bytes().strip()
        want = manifest_signature(expected.key, manifest.read_bytes()).encode()
        if not hmac.compare_digest(got, want):
            raise BundleError(f"{signature}: does not match manifest.json under this key (modified, or another key)")


def _check_ids(bundle: Bundle) -> None:
    m = bundle.manifest  # its ids are sorted and unique: their encoding can hold nothing else (formats.decode_ids)
    n_items, capacity = len(m.items.ids), m.shard_policy.shard_size
    if n_items > capacity:
        raise BundleError(f"{bundle.path / MANIFEST}: items.ids holds {n_items:,} ids but the program's item table has "
                          f"room for shard_policy.shard_size = {capacity:,}")
    from_sources = sum(v for k, v in m.shard_policy.sources.items() if k != "categories_over_capacity")
    if from_sources != n_items:
        raise BundleError(f"{bundle.path / MANIFEST}: items.ids holds {n_items:,} ids but shard_policy.sources add "
                          f"up to {from_sources:,}")


def _check_refresh(bundle: Bundle, golden) -> float | None:
    """A bundle with `manifest.refresh`: its refresh cases replayed through the client loop with the
    refresh program in the runtime (None without refresh)."""
    m = bundle.manifest
    if m.refresh is None:
        if golden.refresh_cases:
            raise BundleError(f"{bundle.path / GOLDEN}: refresh_cases, but the manifest's refresh is null")
        return None
    if not golden.refresh_cases:
        raise BundleError(f"{bundle.path / GOLDEN}: no refresh_cases for the manifest's refresh program")
    size = len(m.user_state)
    for case in golden.refresh_cases:
        if len(case.state_before) != size or len(case.state_after) != size:
            raise BundleError(f"{bundle.path / GOLDEN}: refresh case {case.name}: states of {len(case.state_before)} / "
                              f"{len(case.state_after)} numbers, the manifest's user_state has {size}")
    try:
        worst = refresh_max_diff(m, golden.refresh_cases, bundle.refresh_method)
    except RuntimeError as exc:
        raise BundleError(f"{bundle.path / m.refresh.file}: ExecuTorch could not run it "
                          f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    tolerance = min(case.tolerance for case in golden.refresh_cases)
    if not worst <= tolerance:
        raise BundleError(f"{bundle.path}: refresh cases differ by {worst:.2e} > tolerance {tolerance:g}")
    return worst


def verify_bundle(path: Path, expected: Expected = Expected()) -> dict:
    """Hashes, manifest, schema and golden vectors replayed in the ExecuTorch runtime."""
    bundle = Bundle(Path(path))
    m = bundle.manifest
    _check_directory(bundle)
    _check_outside(bundle, expected)
    _check_ids(bundle)
    validator = _schema_validator(bundle.path / SCHEMA, m.files[SCHEMA])
    golden = bundle.golden()
    if golden.tolerance != m.golden_tolerance:
        raise BundleError(f"{bundle.path / GOLDEN}: tolerance {golden.tolerance:g} differs from the manifest's {m.golden_tolerance:g}")
    if not golden.cases:
        raise BundleError(f"{bundle.path / GOLDEN}: no cases")
    for case in golden.cases:
        if case.history.user_id != m.user_id:
            raise BundleError(f"{bundle.path / GOLDEN}: case {case.name}: history of user {case.history.user_id}, "
                              f"but the manifest's user_id is {m.user_id}")
        errors = list(validator.iter_errors(case.history.model_dump(mode="json"))) if validator else []
        if errors:
            raise BundleError(f"{bundle.path / GOLDEN}: case {case.name}: history fails the schema: {errors[0].message}")
        if len(case.scores) != len(case.candidates):
            raise BundleError(f"{bundle.path / GOLDEN}: case {case.name}: {len(case.scores)} scores for "
                              f"{len(case.candidates)} candidates")
    requests = [encode(m, case.history, case.request_time, case.candidates) for case in golden.cases]
    worst = golden_max_diff(golden.cases, requests, bundle.execute)
    if not worst <= golden.tolerance:  # NaN fails too
        raise BundleError(f"{bundle.path}: golden vectors differ by {worst:.2e} > tolerance {golden.tolerance:g}")
    refresh_worst = _check_refresh(bundle, golden)
    return {"bundle": str(bundle.path), "kind": m.kind, "user_id": m.user_id, "ok": True, "cases": len(golden.cases),
            "max_abs_diff": worst, "refresh_max_abs_diff": refresh_worst, "items": len(m.items.ids), "categories": len(m.categories.ids),
            "signed": (bundle.path / SIGNATURE).is_file(), "index_checked": expected.manifest_sha256 is not None,
            "signature_checked": expected.key is not None,
            "bytes": {name: (bundle.path / name).stat().st_size for name in sorted(set(m.files) | {MANIFEST})}}


def read_index(index: Path) -> Iterator[tuple[Path, Expected]]:
    """(bundle directory, what its manifest must match) for each line of a `bundles.jsonl`."""
    try:
        lines = Path(index).read_bytes().decode().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{index}: cannot read it ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rel, digest, user_id = entry["path"], entry["manifest_sha256"], entry["user_id"]
            if not isinstance(rel, str) or Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise ValueError("path must be relative, inside the index's directory")
            if not (isinstance(user_id, int) or (user_id is None and entry.get("kind") == "cold_start")) \
                    or not isinstance(digest, str):
                raise ValueError("user_id must be an integer (null for kind cold_start), manifest_sha256 a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{index}:{number}: not an index entry ({type(exc).__name__}: {exc})") from None
        yield Path(index).parent / rel, Expected(manifest_sha256=digest, user_id=user_id, index=str(index),
                                                 cold_start=user_id is None)


def find_bundles(root: Path) -> list[Path]:
    """A bundle directory itself, or every bundle below a bundles directory (the fan-out layout)."""
    root = Path(root)
    if (root / MANIFEST).is_file():
        return [root]
    # Temp and old directories of an interrupted atomic write are hidden (".<user>.tmp-<pid>").
    return sorted(p.parent for p in root.rglob(MANIFEST) if not any(part.startswith(".") for part in p.parent.relative_to(root).parts))


def verify_many(targets: Iterable[tuple[Path, Expected]]) -> Iterator[dict]:
    """One report per bundle, failures included (`ok` False and a one-line `error`): one bad
    bundle never stops the others, and the runtime is loaded once for all of them."""
    for path, expected in targets:
        try:
            yield verify_bundle(path, expected)
        except BundleError as exc:
            yield {"bundle": str(path), "ok": False, "error": str(exc).splitlines()[0]}
        except OSError as exc:
            yield {"bundle": str(path), "ok": False, "error": f"{exc.filename or path}: {exc.strerror or exc}"}
