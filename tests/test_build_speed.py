"""Bundles built fast stay exact: the same bytes whatever the batching, and the cached template."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BUNDLE_FILES = ("model.pte", "manifest.json", "golden.json", "events.schema.json")


def bundle_bytes(path: Path) -> dict[str, bytes]:
    return {name: (path / name).read_bytes() for name in BUNDLE_FILES}


def test_bundle_bytes_do_not_depend_on_which_users_share_a_batch(builder, tmp_path):
    """Issue 11 item 4: golden scores (and so golden.json and the manifest) differed by ~1 ulp
    between a user built alone and the same user built in a batch with others."""
    ids = [int(u) for u in builder.ckpt.users.ids[40:52]]
    batch = {r.user_id: r.path for r in builder.build_many(ids, tmp_path / "batch")}
    reversed_batch = {r.user_id: r.path for r in builder.build_many(ids[::-1], tmp_path / "reversed")}
    differ = []
    for user in ids:
        alone = bundle_bytes(builder.build(user, tmp_path / "alone").path)
        for together in (batch, reversed_batch):
            got = bundle_bytes(together[user])
            differ += [(user, name) for name in BUNDLE_FILES if got[name] != alone[name]]
    assert differ == []


@pytest.fixture(scope="module")
def cached_run(trained_run, tmp_path_factory):
    """A copy of the trained run (its build cache starts empty) after one single-user build."""
    from sdk_builder.bundle.many import BuildSpec, build_many
    from sdk_builder.runs import CHECKPOINT, DATA

    run = tmp_path_factory.mktemp("cached-run")
    for name in (CHECKPOINT, DATA):
        shutil.copy2(trained_run / name, run / name)
    spec = BuildSpec(run=str(run), out=str(run / "first"), recipe="portable", shard_size=300, allow_weak_model=True)
    first = build_many(spec, [user_ids(run)[0]])
    return run, spec, first


def user_ids(run: Path) -> list[int]:
    from sdk_builder.runs import load_checkpoint

    return [int(u) for u in load_checkpoint(run).users.ids]


def test_second_build_of_a_checkpoint_uses_the_cached_template(cached_run, tmp_path):
    from sdk_builder.bundle.many import build_many

    run, spec, first = cached_run
    assert first.template_cache == "written" and first.built == 1
    ids = user_ids(run)
    again = build_many(dataclasses.replace(spec, out=str(tmp_path)), ids[:2])
    assert again.template_cache == "hit" and again.guard_max_abs_diff == 0.0 and again.built == 2
    rows = {r["user_id"]: Path(r["path"]) for r in again.rows}
    assert bundle_bytes(rows[ids[0]]) == bundle_bytes(Path(first.rows[0]["path"]))
    assert all(r["max_golden_diff"] <= 1e-5 for r in again.rows)


def test_stale_or_damaged_cached_template_is_rebuilt_not_trusted(cached_run, tmp_path):
    from sdk_builder.bundle.many import build_many
    from sdk_builder.formats import BUILD_CACHE

    run, spec, first = cached_run
    meta_path = next((run / BUILD_CACHE).glob("template-*.json"))
    meta = json.loads(meta_path.read_text())
    # Consistent files (the hash matches) that stamp a user's table 4 bytes off: a stale template.
    meta["offsets"]["item_table"] += 4
    meta_path.write_text(json.dumps(meta))
    summary = build_many(dataclasses.replace(spec, out=str(tmp_path / "stale")), user_ids(run)[:1])
    assert summary.template_cache == "written"
    assert bundle_bytes(Path(summary.rows[0]["path"])) == bundle_bytes(Path(first.rows[0]["path"]))
    program = next((run / BUILD_CACHE).glob("template-*.pte"))
    program.write_bytes(program.read_bytes()[:-10])  # truncated: its hash no longer matches
    summary = build_many(dataclasses.replace(spec, out=str(tmp_path / "truncated")), user_ids(run)[:1])
    assert summary.template_cache == "written"
    assert bundle_bytes(Path(summary.rows[0]["path"])) == bundle_bytes(Path(first.rows[0]["path"]))


def test_unknown_user_id_is_reported_before_torch_is_imported(cached_run, tmp_path):
    run, _, _ = cached_run
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "sdk_builder.cli", "build", str(run),
                           "--user-shard", "999999999", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "999999999" in lines[-1] and "--skip-unknown" in lines[-1]
    imported = {line.rsplit("|", 1)[-1].strip() for line in lines if line.startswith("import time:")}
    assert "sdk_builder.formats" in imported and "torch" not in imported
    assert not any(tmp_path.iterdir())


def test_loading_a_checkpoint_does_not_import_the_compiler_stack(trained_run):
    """Random init on the meta device used to import torch._dynamo (~1.5 s of every `build`)."""
    code = ("import sys; from sdk_builder.runs import load_checkpoint; load_checkpoint(sys.argv[1], mmap=True); "
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(trained_run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


def test_golden_requests_encode_the_same_with_array_ids_as_with_the_manifest_lists(builder):
    """Golden requests are encoded against the shard's ids as arrays (speed); the apps encode
    against the manifest's lists: both must give the program the same inputs."""
    from sdk_builder.bundle.golden import GOLDEN_CASES, ShardView
    from sdk_builder.client import encode

    compared = 0
    for user in [int(u) for u in builder.ckpt.users.ids[60:64]]:
        shard, _ = builder.shard_for(builder.user_row(user))
        view = ShardView(builder.ckpt, shard)
        assert isinstance(view.items.ids, list) and isinstance(view.categories.ids, list)  # what the manifest holds
        for case in builder.golden_requests(user, shard):
            fast = encode(view.encoding, case.history, case.request_time, case.candidates)
            slow = encode(view, case.history, case.request_time, case.candidates)
            for got, want in zip(fast.tensors(), slow.tensors()):
                assert got.dtype == want.dtype and got.equal(want)
            compared += 1
    assert compared == 4 * GOLDEN_CASES


def test_atomic_write_dir_creates_replaces_and_clears_a_killed_writers_leftovers(tmp_path):
    from sdk_builder.util import atomic_write_dir

    final = tmp_path / "ab" / "cd" / "42"
    atomic_write_dir(final, {"a": b"one", "b": b""})  # parents created
    assert {p.name: p.read_bytes() for p in final.iterdir()} == {"a": b"one", "b": b""}
    leftover = final.parent / ".42.tmp-99999"  # a writer killed mid-write
    leftover.mkdir()
    (leftover / "a").write_bytes(b"half")
    other = final.parent / ".43.tmp-99999"  # another bundle's writer: not ours to clear
    other.mkdir()
    big = bytes(range(256)) * 4096
    atomic_write_dir(final, {"a": big})  # replaces the whole directory
    assert {p.name: p.read_bytes() for p in final.iterdir()} == {"a": big}
    assert sorted(p.name for p in final.parent.iterdir()) == [".43.tmp-99999", "42"]


def test_golden_prior_shortcut_has_the_bytes_of_the_live_prior(builder):
    """Golden cases without events after the build skip `live_positions` (StaticPrior): the prior
    they get must be byte-identical to `shard_prior`'s for the same history, and a history with a
    fresh event must not take the shortcut."""
    import numpy as np
    import torch

    from sdk_builder.bundle.golden import ShardView, StaticPrior
    from sdk_builder.client import encode
    from sdk_builder.program import prior_tables, shard_prior

    checked = fresh = 0
    for user in (int(u) for u in builder.ckpt.users.ids[:6]):
        shard, _ = builder.shard_for(builder.user_row(user))
        tables, view = prior_tables(shard), ShardView(builder.ckpt, shard)
        static = StaticPrior(tables)
        for case in builder.golden_requests(user, shard):
            req = encode(view.encoding, case.history, case.request_time, case.candidates)
            live = shard_prior(tables, torch.from_numpy(np.asarray(req.hist_items, np.int64)),
                               torch.from_numpy(np.asarray(req.hist_timestamps, np.int64))).numpy()
            got = static.prior_for(req.hist_items, req.hist_timestamps)
            if got is None:
                fresh += 1
                assert case.name == "new_events_history"
            else:
                checked += 1
                assert got.tobytes() == live.tobytes(), (user, case.name)
    assert checked >= 4 * 6 and fresh >= 1
