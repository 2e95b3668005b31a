"""Bundle patches (`build --delta-from`, `verify --patch`): old + patch = new, byte for byte, and a bad
patch fails with one line, leaving the old bundle as it was."""

from __future__ import annotations

import hashlib
import random
import shutil
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from sdk_builder.bundle.delta import apply_patch, bundle_files, diff_ops, make_patch, patch_bundle, patch_path
from sdk_builder.cli import main
from sdk_builder.formats import BundleError


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def tree_digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(path).iterdir())}


def rebuild(old: bytes, ops: bytes) -> bytes:
    """The op stream's own definition (docs/bundle-format.md), written independently of delta.py."""
    out, pos = bytearray(), 0
    while pos < len(ops):
        if ops[pos] == 1:
            _, offset, length = struct.unpack_from("<BII", ops, pos)
            out += old[offset : offset + length]
            pos += 9
        else:
            (length,) = struct.unpack_from("<I", ops, pos + 1)
            out += ops[pos + 5 : pos + 5 + length]
            pos += 5 + length
    return bytes(out)


def test_inserted_rows_shift_the_table_and_cost_only_their_own_bytes():
    rng = random.Random(0)
    rows = [rng.randbytes(64) for _ in range(1000)]  # a stamped table: 1000 rows of 16 float32
    old = b"header" + b"".join(rows)
    new_rows = rows[:10] + [rng.randbytes(64)] + rows[10:500] + [rng.randbytes(64)] + rows[500:999]
    new = b"header" + b"".join(new_rows)
    ops = diff_ops(old, new)
    assert rebuild(old, ops) == new
    assert len(ops) < 2 * 64 + 200, len(ops)  # the two new rows plus a few ops, not the shifted 60 KB


@pytest.fixture(scope="module")
def two_bundles(builder, built_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """The session's bundle (old) and another user's (new): a different shard, so ids and rows shift."""
    new = builder.build(int(builder.ckpt.users.ids[8]), tmp_path_factory.mktemp("new")).path
    return Path(built_bundle), new


def test_old_plus_patch_is_the_new_bundle_byte_for_byte(two_bundles, tmp_path):
    old, new = two_bundles
    patch = make_patch(old, new)
    assert apply_patch(bundle_files(old), patch, "p") == bundle_files(new)
    assert len(patch) < 0.5 * sum(len(v) for v in bundle_files(new).values())
    copy = tmp_path / "bundle"
    shutil.copytree(old, copy)
    (tmp_path / "p.patch").write_bytes(patch)
    patch_bundle(copy, tmp_path / "p.patch")
    assert tree_digest(copy) == tree_digest(new)


@pytest.mark.parametrize("flag", ["--delta-from", "--delta-from-dir"])
def test_build_delta_from_writes_a_patch_verify_accepts(trained_run, two_bundles, tmp_path, flag):
    old, _ = two_bundles
    user = old.name  # the same user rebuilt at another golden seed
    source = old if flag == "--delta-from" else old.parents[2]  # the bundle, or the --out it was built into
    built = cli("build", str(trained_run), "--user-shard", user, "--recipe", "portable", "--shard-size", "300",
                "--seed", "5", "--out", str(tmp_path / "out"), flag, str(source))
    assert built.exit_code == 0, built.output
    new = next(p.parent for p in (tmp_path / "out").rglob("manifest.json"))
    assert patch_path(new).is_file() and f"patch {patch_path(new).stat().st_size:,} B" in built.output
    checked = cli("verify", str(new), "--patch", str(patch_path(new)), "--old", str(old))
    assert checked.exit_code == 0 and f"= {old} + " in checked.output, checked.output


@pytest.mark.parametrize("damage", ["body", "other_old"])
def test_a_bad_patch_fails_in_one_line_and_leaves_the_old_bundle(two_bundles, tmp_path, damage):
    old, new = two_bundles
    copy = tmp_path / "bundle"
    shutil.copytree(old, copy)
    before = tree_digest(copy)
    patch = bytearray(make_patch(old, new))
    if damage == "body":
        patch[-20] ^= 0xFF
    else:  # made for another old bundle
        patch = bytearray(make_patch(new, old))
    (tmp_path / "p.patch").write_bytes(patch)
    with pytest.raises(BundleError) as err:
        patch_bundle(copy, tmp_path / "p.patch")
    assert "\n" not in str(err.value) and str(tmp_path / "p.patch") in str(err.value)
    assert tree_digest(copy) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "p.patch"]  # no temp directory left


def test_verify_rejects_a_patch_that_builds_another_bundle(two_bundles, tmp_path):
    old, new = two_bundles
    identity = tmp_path / "same.patch"
    identity.write_bytes(make_patch(old, old))  # a valid patch, but old + it = old, not new
    result = cli("verify", str(new), "--patch", str(identity), "--old", str(old))
    assert result.exit_code == 1
    assert f"FAILED {identity}: {old} + patch differs from {new}/" in result.output
