"""Bundle patches (`build --delta-from`, `verify --patch`): old + patch = new, byte for byte, and a bad
patch fails with one line, leaving the old bundle as it was."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from model.tbsm import RESERVED_ROWS
from sdk_builder.bundle.delta import (
    PreviousBundles, apply_patch, bundle_files, diff_ops, make_patch, patch_bundle, patch_path,
)
from sdk_builder.cli import main
from sdk_builder.formats import MANIFEST, SIGNATURE, BundleError
from tests.support import shard_ids


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


def test_the_header_hashes_only_the_files_the_new_manifest_does_not_cover(two_bundles, tmp_path):
    """manifest.json has new_manifest_sha256 and the files it lists their sha256 in it; the
    signature is the one file that needs the header's own, and a file with neither is refused."""
    old, new = two_bundles
    signed = tmp_path / "signed"
    shutil.copytree(new, signed)
    (signed / SIGNATURE).write_bytes(b"\x07" * 32)
    patch = make_patch(old, signed)
    end = patch.index(b"\n")
    header = json.loads(patch[:end])
    assert {f["name"] for f in header["files"] if "sha256" in f} == {SIGNATURE}
    assert apply_patch(bundle_files(old), patch, "p") == bundle_files(signed)
    wrong = json.loads(patch[:end])
    wrong["files"] = [{**f, "sha256": "0" * 64} if "sha256" in f else f for f in wrong["files"]]
    with pytest.raises(BundleError, match=f"{SIGNATURE}: rebuilt file differs from the header's size/sha256"):
        apply_patch(bundle_files(old), json.dumps(wrong).encode() + patch[end:], "p")
    header["files"] = [{k: v for k, v in f.items() if k != "sha256"} for f in header["files"]]
    unhashed = json.dumps(header).encode() + patch[end:]
    with pytest.raises(BundleError, match=f"{SIGNATURE}: no sha256 in the header and not listed in the new manifest"):
        apply_patch(bundle_files(old), unhashed, "p")


def test_verify_rejects_a_patch_that_builds_another_bundle(two_bundles, tmp_path):
    old, new = two_bundles
    identity = tmp_path / "same.patch"
    identity.write_bytes(make_patch(old, old))  # a valid patch, but old + it = old, not new
    result = cli("verify", str(new), "--patch", str(identity), "--old", str(old))
    assert result.exit_code == 1
    assert f"FAILED {identity}: {old} + patch differs from {new}/" in result.output


def test_hysteresis_keeps_the_previous_shard_but_lets_the_top_new_items_in():
    from sdk_builder.data.dataset import prepare
    from sdk_builder.data.synthetic import generate_taobao_events
    from sdk_builder.shard import ShardIndex, ShardPolicy

    data = prepare(generate_taobao_events(80, n_items=2000, n_categories=30, seed=4), seed=4)
    index = ShardIndex(data, ShardPolicy(shard_size=200))
    larger = ShardIndex(data, ShardPolicy(shard_size=800))
    slack, fewer_new = 3.0, 0
    for user in range(20):
        sl = data.user_events(user)
        items, cats = data.item_rows[sl], data.cat_rows[sl]
        cut = max(1, len(items) - 10)  # the previous shard: before the user's last 10 events
        previous, _ = index.select(items[:cut], cats[:cut])
        fresh, fresh_sources = index.select_ranked(items, cats)
        assert np.array_equal(index.select_ranked(items, cats, None)[0], fresh)
        assert np.array_equal(index.select_ranked(items, cats, previous, slack=0)[0], fresh)
        kept, sources = index.select_ranked(items, cats, previous, slack)
        assert len(kept) == len(np.unique(kept)) == 200 and sum(sources.values()) == 200
        assert np.isin(fresh[: fresh_sources["recent"]], kept).all()  # the history's rows are always there
        # The policy's order past the shard: the fresh shard, then the rest of a (1 + slack) times larger one.
        longer, _ = larger.select_ranked(items, cats)
        position = {item: k for k, item in enumerate([*fresh.tolist(), *(i for i in longer.tolist() if i not in set(fresh.tolist()))])}
        order = [position.get(i) for i in kept.tolist()]
        assert None not in order and order == sorted(order)  # kept in the policy's order
        # Items new to the shard enter by rank; an old item leaves only for one ranked (1 + slack) times higher.
        old, recent = set(previous.tolist()), set(fresh[: fresh_sources["recent"]].tolist())
        new_in = [position[i] for i in kept.tolist() if i not in old and i not in recent]
        new_out = [position[i] for i in fresh.tolist() if i not in set(kept.tolist()) and i not in old]
        old_out = [position[i] / (1 + slack) for i in position if i in old and i not in set(kept.tolist())]
        assert not new_in or max(new_in) < min(new_out + old_out + [len(position)])
        assert sources.get("previous", 0) == len(set(fresh.tolist()) - set(kept.tolist()))
        fewer_new += len(set(kept.tolist()) - set(previous.tolist())) < len(set(fresh.tolist()) - set(previous.tolist()))
    assert fewer_new >= 10


@pytest.fixture(scope="module")
def newer_day(builder):
    """The session's data plus a day in which user 7 browses user 20's items: the shard moves."""
    from sdk_builder.data.dataset import extend_events
    from sdk_builder.data.events import EventLog

    ckpt, data = builder.ckpt, builder.data
    other = data.user_events(20)
    items, cats = data.item_rows[other][-15:], data.cat_rows[other][-15:]
    start = int(data.timestamps[data.user_events(7)][-1]) + 86_400
    log = EventLog(np.full(len(items), int(ckpt.users.ids[7])), ckpt.items.global_id(items),
                   ckpt.categories.global_id(cats), np.ones(len(items), np.int8), start + 60 * np.arange(len(items)))
    extended, counts = extend_events(data, log)
    assert counts["added"] == len(items)
    return extended


def test_a_rebuild_that_knows_the_old_bundle_ships_a_smaller_patch_and_is_deterministic(builder, built_bundle,
                                                                                       newer_day, tmp_path):
    from sdk_builder.bundle.build import BundleBuilder

    user, old = int(builder.ckpt.users.ids[7]), Path(built_bundle)
    bundles = {}
    for name, slack in (("fresh", 0.0), ("kept", 3.0), ("kept-again", 3.0)):
        rebuild = BundleBuilder(builder.ckpt, newer_day, builder.policy, recipe=builder.recipe,
                                previous=PreviousBundles(bundle=old), shard_slack=slack)
        rebuild.template = builder.template  # same checkpoint, recipe and layout
        bundles[name] = rebuild.build(user, tmp_path / name).path
    fresh, kept = bundle_files(bundles["fresh"]), bundle_files(bundles["kept"])
    assert bundle_files(bundles["kept-again"]) == kept  # same inputs and old bundle: same bytes
    patch = make_patch(old, bundles["kept"])
    assert apply_patch(bundle_files(old), patch, "p") == kept
    assert len(patch) < 0.8 * len(make_patch(old, bundles["fresh"]))
    ids = {name: set(shard_ids(json.loads(files[MANIFEST])["items"])) for name, files in (("fresh", fresh), ("kept", kept))}
    old_ids = set(shard_ids(json.loads(bundle_files(old)[MANIFEST])["items"]))
    assert len(ids["kept"] - old_ids) < len(ids["fresh"] - old_ids)
    manifests = {name: json.loads(files[MANIFEST]) for name, files in (("fresh", fresh), ("kept", kept))}
    assert manifests["kept"]["shard_policy"]["sources"]["previous"] > 0
    assert manifests["kept"]["build_key"] != manifests["fresh"]["build_key"]  # it depends on the slack
    # Both depend on the old bundle (the kept one on its items, both on its slots): neither is a plain build.
    assert not rebuild.is_current(bundles["fresh"]) and not rebuild.is_current(bundles["kept"])


def test_a_rebuild_keeps_the_slots_of_the_items_it_keeps_and_ranks_as_without_them(builder, built_bundle, newer_day,
                                                                                   tmp_path):
    """Items in both the old and the rebuilt shard keep their table rows (slots), the new items fill
    the freed ones, and the slots change no score: the stamped program of the rebuilt shard ranks,
    in the runtime, exactly like that of the same shard stored in row order."""
    import dataclasses

    import torch

    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.bundle.golden import ShardView
    from sdk_builder.client import encode
    from sdk_builder.formats import PROGRAM
    from sdk_builder.program import user_state
    from sdk_builder.runtime import load_runtime_method

    user, old = int(builder.ckpt.users.ids[7]), Path(built_bundle)
    rebuild = BundleBuilder(builder.ckpt, newer_day, builder.policy, recipe=builder.recipe,
                            previous=PreviousBundles(bundle=old), shard_slack=3.0)
    rebuild.template = builder.template
    new = rebuild.build(user, tmp_path / "new").path

    def slots_by_id(bundle):
        ids = shard_ids(json.loads((bundle / MANIFEST).read_bytes())["items"])
        slot = builder.template.constant((bundle / PROGRAM).read_bytes(), "item_slot")
        return dict(zip(ids, slot[RESERVED_ROWS : RESERVED_ROWS + len(ids)].tolist()))

    before, after = slots_by_id(old), slots_by_id(new)
    common = set(before) & set(after)
    assert len(common) < len(after) and all(before[i] == after[i] for i in common)
    assert sorted(after.values()) == list(range(RESERVED_ROWS, RESERVED_ROWS + len(after)))
    ids = sorted(after)
    assert [after[i] for i in ids] != list(range(RESERVED_ROWS, RESERVED_ROWS + len(ids)))  # really permuted

    previous, _ = rebuild.previous_shard(user)
    shard, _ = rebuild.shard_for(rebuild.user_row(user), previous)
    row_order = dataclasses.replace(shard, item_slot=None)
    programs = [load_runtime_method(rebuild.template.stamp(rebuild.constants_for(s))) for s in (shard, row_order)]
    assert (new / PROGRAM).read_bytes() == rebuild.template.stamp(rebuild.constants_for(shard))
    state = user_state(rebuild.model, shard.user_row)
    view = ShardView(rebuild.ckpt, shard)
    cases = rebuild.golden_requests(user, shard)
    assert len(cases) >= 3
    for case in cases:
        request = encode(view, case.history, case.request_time, case.candidates).tensors()
        a, b = (p.execute([*request[:6], state])[0] for p in programs)
        assert torch.equal(a, b)


def test_the_old_bundle_of_another_user_is_refused_in_one_line(builder, built_bundle, tmp_path):
    from sdk_builder.bundle.build import BundleBuilder

    rebuild = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe=builder.recipe,
                            previous=PreviousBundles(bundle=Path(built_bundle)))
    rebuild.template = builder.template
    other = int(builder.ckpt.users.ids[8])
    with pytest.raises(BundleError) as err:
        rebuild.build(other, tmp_path)
    assert "\n" not in str(err.value) and f"not the user {other} being built" in str(err.value)
    assert not any(tmp_path.iterdir())


def test_an_old_program_with_a_broken_slot_table_is_refused_in_one_line(builder, built_bundle, tmp_path):
    """The old bundle's program is stamped from the same template, but its item_slot table repeats a
    slot: the rebuild refuses it (naming the file) instead of keeping slots that are no permutation."""
    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.formats import PROGRAM

    old = tmp_path / "old"
    shutil.copytree(built_bundle, old)
    program = bytearray((old / PROGRAM).read_bytes())
    at = builder.template.offsets["item_slot"] + 2 * RESERVED_ROWS
    program[at + 2 : at + 4] = program[at : at + 2]  # the second item gets the first item's slot
    (old / PROGRAM).write_bytes(bytes(program))
    rebuild = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe=builder.recipe,
                            previous=PreviousBundles(bundle=old))
    rebuild.template = builder.template
    with pytest.raises(BundleError) as err:
        rebuild.build(int(builder.ckpt.users.ids[7]), tmp_path / "out")
    assert "\n" not in str(err.value) and f"{old / PROGRAM}" in str(err.value) and "item_slot" in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
