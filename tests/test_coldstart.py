"""The cold-start bundle (`build --new-user`): no user's row, byte-identical rebuilds, verifies and
ranks with an empty history; held-out users reach neither training nor the shard."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.support import shard_ids


@pytest.fixture(scope="module")
def cold_bundle(builder, tmp_path_factory):
    from sdk_builder.bundle.coldstart import build_cold_start

    return build_cold_start(builder, tmp_path_factory.mktemp("cold")).path


def test_cold_start_bundle_holds_no_users_row(builder, cold_bundle):
    from sdk_builder.bundle.coldstart import population_state
    from sdk_builder.program import user_state

    manifest = json.loads((cold_bundle / "manifest.json").read_text())
    assert manifest["kind"] == "cold_start" and manifest["user_id"] is None
    golden = json.loads((cold_bundle / "golden.json").read_text())
    assert {c["history"]["user_id"] for c in golden["cases"]} == {None}
    state = population_state(builder.model)
    rows = builder.model.tower.user_emb.weight.detach().numpy()
    emb = rows.shape[1]
    assert np.min(np.abs(rows - state[:emb]).max(axis=1)) > 1e-6  # not any trained user's vector
    # The manifest ships the population state where a personal bundle ships its user's.
    assert np.array_equal(np.asarray(manifest["user_state"], np.float32), state)
    assert not np.array_equal(state, user_state(builder.ckpt.model, 7).numpy())
    items = set(shard_ids(manifest["items"]))
    popular = builder.ckpt.items.global_id(builder.index.popular[:100]).tolist()
    assert set(popular) <= items  # the most popular items are all in it


def test_cold_start_builds_byte_identically(builder, cold_bundle, tmp_path):
    from sdk_builder.bundle.coldstart import build_cold_start

    again = build_cold_start(builder, tmp_path).path
    for name in ("model.pte", "manifest.json", "golden.json", "events.schema.json"):
        assert (again / name).read_bytes() == (cold_bundle / name).read_bytes(), name


def test_cold_start_verifies_and_ranks_an_empty_history(cold_bundle, tmp_path):
    from sdk_builder.bundle.verify import verify_bundle
    from sdk_builder.client import Bundle, parse_history

    report = verify_bundle(cold_bundle)
    assert report["ok"] and report["kind"] == "cold_start" and report["user_id"] is None
    bundle = Bundle(cold_bundle)
    ids = bundle.manifest.items.ids[:50]
    for user_id in ("null", "123456789"):  # a new install, with or without an id of its own
        history = parse_history(f'{{"user_id": {user_id}, "events": []}}')
        scores = bundle.score(history, 1_700_000_000, ids)
        assert scores.shape == (50,) and np.all((scores > 0) & (scores < 1)) and np.ptp(scores) > 0


def test_cli_new_user_beside_personal_bundles_and_index(trained_run, builder, tmp_path):
    from click.testing import CliRunner

    from sdk_builder.cli import main

    out = tmp_path / "bundles"
    user = str(int(builder.ckpt.users.ids[3]))
    args = ["build", str(trained_run), "--user-shard", user, "--new-user", "--recipe", "portable", "--shard-size", "300",
            "--out", str(out), "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    index = [json.loads(line) for line in (out / "bundles.jsonl").read_text().splitlines()]
    assert [(e["user_id"], e.get("kind")) for e in index] == [(None, "cold_start"), (int(user), None)]
    assert (out / "cold_start" / "manifest.json").is_file()
    verified = CliRunner().invoke(main, ["verify", "--index", str(out / "bundles.jsonl"), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.output)["summary"]["ok"] == 2


def test_held_out_users_reach_neither_training_nor_the_shard():
    from sdk_builder.bundle.coldstart import hold_out_users
    from sdk_builder.data.dataset import prepare
    from sdk_builder.data.synthetic import generate_taobao_events
    from sdk_builder.shard import ShardIndex, ShardPolicy

    events = generate_taobao_events(200, n_items=2000, n_categories=20, seed=5)
    kept, held = hold_out_users(events, 0.2, seed=5)
    held_users = np.unique(held.user)
    assert 0.1 < len(held_users) / len(np.unique(events.user)) < 0.3
    assert not np.isin(kept.user, held_users).any() and len(kept) + len(held) == len(events)
    data = prepare(kept, seed=5)
    assert not np.isin(data.users.ids, held_users).any()
    only_held = np.setdiff1d(np.unique(held.item), np.unique(kept.item))
    assert len(only_held) and not np.isin(data.items.ids, only_held).any()  # not in the id maps, so never in a shard
    counts = ShardIndex(data, ShardPolicy()).popularity
    kept_counts = np.bincount(data.items.lookup(kept.item), minlength=data.items.rows)
    kept_counts[:2] = 0
    assert np.array_equal(counts, kept_counts)  # popularity counts the kept users' events only


def test_user_dropout_trains_an_unknown_user_row_the_cold_start_bundle_ships(tmp_path, one_thread):
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.bundle.coldstart import build_cold_start, population_state
    from sdk_builder.data.dataset import prepare
    from sdk_builder.data.synthetic import generate_taobao_events
    from sdk_builder.runs import load_checkpoint, train_run, unknown_user_row

    data = prepare(generate_taobao_events(120, n_items=800, n_categories=12, seed=4), seed=4)
    train_run(data, tmp_path / "run", TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=4, user_dropout=0.2))
    ckpt = load_checkpoint(tmp_path / "run")
    row = unknown_user_row(ckpt.config, ckpt.payload["train_config"])
    assert row == len(data.users.ids) == ckpt.config.num_users - 1
    table = ckpt.model.tower.user_emb.weight.detach()
    assert table[row].norm() > 0.1  # trained: user rows start at zero
    state = population_state(ckpt.model, "unknown", row)
    assert np.array_equal(state[: table.shape[1]], table[row].numpy())
    builder = BundleBuilder(ckpt, data, recipe="portable", stamping=False, allow_weak_model=True)
    manifest = json.loads((build_cold_start(builder, tmp_path / "out", population="unknown").path / "manifest.json").read_text())
    assert np.array_equal(np.asarray(manifest["user_state"], np.float32), state)
