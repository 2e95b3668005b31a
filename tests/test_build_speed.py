"""Bundles built fast stay exact: the same bytes whatever the batching, and the cached template."""

from __future__ import annotations

from pathlib import Path

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
