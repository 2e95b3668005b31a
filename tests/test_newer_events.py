"""Bundles of the same checkpoint after more events arrived: `extend_events` and `build --events`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from model.tbsm import OOV_ROW
from sdk_builder.data.dataset import PreparedData, extend_events, prepare
from sdk_builder.data.events import EventLog
from sdk_builder.data.synthetic import generate_taobao_events
from sdk_builder.formats import BEHAVIOR_NAMES, BundleError, GoldenSet

CLI = [sys.executable, "-m", "sdk_builder.cli"]


def concat(*logs: EventLog) -> EventLog:
    return EventLog(*(np.concatenate([getattr(log, f) for log in logs]) for f in ("user", "item", "category", "behavior", "timestamp")))


def one_event(user: int, item: int, category: int, timestamp: int) -> EventLog:
    return EventLog(np.array([user]), np.array([item]), np.array([category]), np.array([1], np.int8), np.array([timestamp]))


def test_extend_adds_only_newer_events_and_counts_the_rest():
    full = generate_taobao_events(60, n_items=500, n_categories=20, seed=5)
    data = prepare(full, seed=5, holdout_last=4)
    user = int(data.users.ids[0])
    newest = int(full.timestamp.max())
    extra = concat(one_event(10**12, int(full.item[0]), int(full.category[0]), newest + 1),  # no row in the run
                   one_event(user, 10**12, 10**12, newest + 2))  # an item and a category the run never saw
    extended, counts = extend_events(data, concat(full, extra))

    assert counts["read"] == len(full) + 2
    assert counts["unknown_user"] == 1
    added_items = np.concatenate([extended.item_rows[extended.user_events(r)][data.user_events(r).stop - data.user_events(r).start:]
                                  for r in range(len(data.users.ids))])
    assert counts["unknown_item"] == int((added_items == OOV_ROW).sum()) >= 1  # held-out items may be new too
    assert counts["unknown_category"] >= 1
    # The log repeats the run's own events: those are not newer, the held-out last events mostly are.
    assert counts["added"] + counts["not_newer"] + counts["unknown_user"] == counts["read"]
    assert 0 < counts["added"] <= len(data.future.item_rows) + 1
    assert extended.num_events == data.num_events + counts["added"]
    assert extended.info["extends"] == data.fingerprint() and extended.info["extended_with"] == counts
    for row in range(len(data.users.ids)):
        old, new = data.user_events(row), extended.user_events(row)
        kept = new.stop - new.start - (old.stop - old.start)
        assert kept >= 0
        # The run's own events come first and unchanged; what follows is later than all of them.
        assert np.array_equal(extended.item_rows[new][: old.stop - old.start], data.item_rows[old])
        assert np.array_equal(extended.timestamps[new][: old.stop - old.start], data.timestamps[old])
        if kept and old.stop > old.start:
            assert extended.timestamps[new][-kept:].min() > data.timestamps[old][-1]
            assert np.all(np.diff(extended.timestamps[new][-kept:]) >= 0)
    last = extended.user_events(0)
    assert extended.item_rows[last.stop - 1] == OOV_ROW and extended.timestamps[last.stop - 1] == newest + 2


def test_builder_takes_extended_data_of_its_own_run_only(builder, tmp_path):
    from sdk_builder.bundle.build import BundleBuilder

    ckpt, data = builder.ckpt, builder.data
    user_row = 7
    user = int(ckpt.users.ids[user_row])
    popular_item = int(ckpt.items.ids[builder.index.popular[0] - 2])
    category = int(ckpt.categories.global_id(ckpt.item_category[builder.index.popular[:1]])[0])
    when = int(data.timestamps[data.user_events(user_row)][-1]) + 60
    extended, counts = extend_events(data, one_event(user, popular_item, category, when))
    assert counts["added"] == 1

    newer = BundleBuilder(ckpt, extended, builder.policy, recipe=builder.recipe)
    newer.template = builder.template  # same checkpoint, recipe and layout: the same template
    bundle = newer.build(user, tmp_path).path
    history = GoldenSet.model_validate_json((bundle / "golden.json").read_bytes()).cases[0].history.events
    assert (history[-1].item_id, history[-1].timestamp, history[-1].behavior) == (popular_item, when, BEHAVIOR_NAMES[1])
    assert newer.build_key != builder.build_key

    other = prepare(generate_taobao_events(30, n_items=200, n_categories=10, seed=9), seed=9)
    foreign, _ = extend_events(other, one_event(int(other.users.ids[0]), 1, 1, 2**40))
    with pytest.raises(BundleError, match="fingerprint"):
        BundleBuilder(ckpt, foreign, builder.policy, recipe=builder.recipe)
    with pytest.raises(BundleError, match="fingerprint"):  # "extends" must name this run's data
        BundleBuilder(ckpt, replace(extended, info={**extended.info, "extends": other.fingerprint()}), builder.policy)


def test_build_events_option_reports_what_it_added(trained_run, builder, tmp_path):
    ckpt, data = builder.ckpt, builder.data
    user = int(ckpt.users.ids[3])
    last = int(data.timestamps[data.user_events(3)][-1])
    item, category = int(ckpt.items.ids[0]), int(ckpt.categories.ids[0])
    log = tmp_path / "day2.csv"  # Taobao's headerless format: user, item, category, behaviour, timestamp
    log.write_text(f"{user},{item},{category},pv,{last + 10}\n{user},{item},{category},pv,{last}\n"
                   f"999999999,{item},{category},pv,{last + 10}\n")
    result = subprocess.run([*CLI, "build", str(trained_run), "--user-shard", str(user), "--events", str(log),
                             "--recipe", "portable", "--shard-size", "300", "--out", str(tmp_path / "out"), "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)["summary"]
    assert summary["newer_events"] == {"read": 3, "unknown_user": 1, "not_newer": 1, "unknown_item": 0,
                                       "unknown_category": 0, "added": 1}
    bundle = Path(json.loads(result.stdout)["bundles"][0]["path"])
    history = GoldenSet.model_validate_json((bundle / "golden.json").read_bytes()).cases[0].history.events
    assert (history[-1].item_id, history[-1].timestamp) == (item, last + 10)
    assert "1 of 3 added" in subprocess.run(
        [*CLI, "build", str(trained_run), "--user-shard", str(user), "--events", str(log), "--recipe", "portable",
         "--shard-size", "300", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=600).stdout
