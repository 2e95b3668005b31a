"""Sample protocols (holdout, reference), collate, fingerprint and save/load of PreparedData."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.tbsm import PADDING_ROW
from sdk_builder.data.dataset import PreparedData, SampleSet, prepare
from sdk_builder.data.events import EventLog
from sdk_builder.data.synthetic import generate_taobao_events

HIST = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def synthetic_events() -> EventLog:
    return generate_taobao_events(300, n_items=3_000, n_categories=60, events_per_user=(3, 60), seed=11)


def hand_made_log() -> EventLog:
    """user 100: 6 events; user 200: 3 events (too short for holdout); user 300: 25 events.

    Item 900 has category 9 and is touched only by user 300; user 100 revisits item 11.
    """
    rows = []
    t = 1_600_000_000
    for k, item in enumerate([11, 12, 13, 11, 14, 15]):
        rows.append((100, item, 1 if item < 14 else 2, 1, t + 60 * k))
    for k, item in enumerate([21, 22, 23]):
        rows.append((200, item, 3, 1, t + 10 + 3600 * k))
    for k in range(25):
        item = 900 if k == 3 else 30 + k
        rows.append((300, item, 9 if item == 900 else 4 + k % 3, 1 + k % 4, t + 5 + 600 * k))
    user, item, cat, beh, ts = (np.array(c, dtype=np.int64) for c in zip(*rows))
    return EventLog(user, item, cat, beh.astype(np.int8), ts)


def user_of_event(data: PreparedData) -> np.ndarray:
    return np.repeat(np.arange(len(data.users.ids)), np.diff(data.user_start))


def touched_pairs(data: PreparedData) -> set[tuple[int, int]]:
    return set(zip(user_of_event(data).tolist(), data.item_rows.tolist()))


def expected_window(data: PreparedData, user: int, cand: int, neg: int):
    """Per-sample Python reconstruction of a collated row (items, cats, behaviours, timestamps)."""
    start = int(data.user_start[user])
    assert start <= cand < data.user_start[user + 1]
    lo = max(start, cand - HIST)
    idx = list(range(lo, cand + 1))
    pad = HIST + 1 - len(idx)
    items = [PADDING_ROW] * pad + [int(data.item_rows[i]) for i in idx]
    cats = [PADDING_ROW] * pad + [int(data.cat_rows[i]) for i in idx]
    ts = [0] * pad + [int(data.timestamps[i]) for i in idx]
    if neg >= 0:
        items[-1] = neg
        cats[-1] = int(data.item_category[neg])
    return items, cats, ts


def check_collate(data: PreparedData, samples: SampleSet, limit: int = 400) -> None:
    take = np.arange(min(len(samples), limit))
    sub = samples.take(take)
    batch = data.collate(sub, HIST)
    assert batch.item_rows.shape == (len(take), HIST + 1)
    assert batch.timestamps.dtype == torch.int64
    assert torch.equal(batch.labels, torch.from_numpy((sub.negative_item < 0).astype(np.float32)))
    for r in range(len(take)):
        items, cats, ts = expected_window(data, int(sub.user[r]), int(sub.candidate[r]), int(sub.negative_item[r]))
        assert batch.item_rows[r].tolist() == items
        assert batch.cat_rows[r].tolist() == cats
        assert batch.timestamps[r].tolist() == ts
        assert int(batch.user_rows[r]) == int(sub.user[r])


# ---------------------------------------------------------------- holdout


def check_holdout(data: PreparedData) -> None:
    n = np.diff(data.user_start)
    eligible = np.flatnonzero(n >= 4)
    touched = touched_pairs(data)
    last = data.user_start[1:] - 1
    for split, offset in (("test", 0), ("validation", 1)):
        s = data.splits[split]
        assert len(s) == 2 * len(eligible)
        pos, neg = s.negative_item < 0, s.negative_item >= 0
        for part in (pos, neg):  # exactly one positive and one negative per eligible user
            assert np.array_equal(np.sort(s.user[part]), eligible)
        assert np.array_equal(s.candidate, last[s.user] - offset)
    train = data.splits["train"]
    val_event = last - 1
    assert len(train) > 0
    assert np.all(train.candidate < val_event[train.user])  # nothing at or after the validation event
    assert np.all(train.candidate >= data.user_start[train.user])
    assert np.all(data.timestamps[train.candidate] <= data.timestamps[val_event[train.user]])
    assert np.isin(train.user, eligible).all()
    # every positive has a negative twin with the same (user, candidate)
    pos = train.negative_item < 0
    assert pos.sum() == (~pos).sum()
    assert sorted(zip(train.user[pos], train.candidate[pos])) == sorted(zip(train.user[~pos], train.candidate[~pos]))
    # candidates of a user are distinct
    keys = train.user[pos] * data.num_events + train.candidate[pos]
    assert len(np.unique(keys)) == len(keys)
    # negatives: real item rows the user never touched
    for split in ("train", "validation", "test"):
        s = data.splits[split]
        negs = s.negative_item >= 0
        assert np.all(s.negative_item[negs] >= 2) and np.all(s.negative_item[negs] < data.items.rows)
        for u, it in zip(s.user[negs].tolist(), s.negative_item[negs].tolist()):
            assert (u, it) not in touched


def test_holdout_on_synthetic(synthetic_events):
    data = prepare(synthetic_events, protocol="holdout", seed=3)
    n = np.diff(data.user_start)
    assert (n < 4).any(), "the fixture should contain users too short for holdout"
    assert data.info["users_skipped_too_short"] == int((n < 4).sum())
    check_holdout(data)
    # up to 20 positives per user
    train = data.splits["train"]
    per_user = np.bincount(train.user[train.negative_item < 0], minlength=len(n))
    assert per_user.max() == 20
    assert np.all(per_user[n >= 4] == np.minimum(20, n[n >= 4] - 3))
    for split in ("train", "validation", "test"):
        check_collate(data, data.splits[split])


def test_holdout_on_hand_made_log():
    data = prepare(hand_made_log(), protocol="holdout", seed=0)
    assert data.users.ids.tolist() == [100, 200, 300]
    check_holdout(data)
    test = data.splits["test"]
    assert sorted(set(test.user.tolist())) == [0, 2]  # user 200 (3 events) skipped
    assert data.info["users_skipped_too_short"] == 1
    # user 100: events 0..5 -> test candidate 5, validation 4, training candidates 1..3
    train = data.splits["train"]
    u0 = train.user == 0
    assert sorted(set(train.candidate[u0].tolist())) == [1, 2, 3]
    # user 100 touched item 11 twice; negatives are never any of 11..15
    item_900 = int(data.items.lookup(np.array([900]))[0])
    for s in data.splits.values():
        negs = s.negative_item[(s.user == 0) & (s.negative_item >= 0)]
        assert not np.isin(negs, data.items.lookup(np.array([11, 12, 13, 14, 15]))).any()
    assert data.item_category[item_900] == data.categories.lookup(np.array([9]))[0]
    check_collate(data, train)
    # explicit left padding of the shortest window: user 100, candidate at its 2nd event
    one = SampleSet(np.array([0]), np.array([1]), np.array([-1]))
    b = data.collate(one, HIST)
    assert b.item_rows[0, :19].tolist() == [PADDING_ROW] * 19
    assert b.timestamps[0, :19].tolist() == [0] * 19
    assert b.behaviors[0, :19].tolist() == [0] * 19
    assert b.item_rows[0, 19:].tolist() == data.items.lookup(np.array([11, 12])).tolist()
    assert b.timestamps[0, -1] == 1_600_000_060
    # a negative swaps the candidate item and its category, keeps the timestamp and the history
    neg = SampleSet(np.array([0, 0]), np.array([4, 4]), np.array([-1, item_900]))
    b = data.collate(neg, HIST)
    assert torch.equal(b.item_rows[0, :-1], b.item_rows[1, :-1])
    assert torch.equal(b.timestamps[0], b.timestamps[1])
    assert int(b.item_rows[1, -1]) == item_900
    assert int(b.cat_rows[1, -1]) == int(data.categories.lookup(np.array([9]))[0])
    assert int(b.cat_rows[0, -1]) == int(data.categories.lookup(np.array([2]))[0])
    assert b.labels.tolist() == [1.0, 0.0]
    # a window never crosses into the previous user's events
    first_of_300 = SampleSet(np.array([2]), np.array([data.user_start[2] + 2]), np.array([-1]))
    b = data.collate(first_of_300, HIST)
    assert b.item_rows[0, :18].tolist() == [PADDING_ROW] * 18


# ---------------------------------------------------------------- reference


def test_reference_on_synthetic(synthetic_events):
    data = prepare(synthetic_events, protocol="reference", seed=5)
    n = np.diff(data.user_start)
    last_time = data.timestamps[data.user_start[1:] - 1]
    split = data.info["split_time"]
    expected_test = np.flatnonzero(last_time > split)
    test = data.splits["test"]
    assert np.array_equal(np.sort(test.user), expected_test)
    assert len(np.unique(test.user)) == len(test.user)
    # split time is the 70th percentile of last-event times
    below = np.mean(last_time <= split)
    assert 0.7 <= below <= 0.7 + 2 / len(last_time)
    assert split in last_time
    # test point: the user's last event, kept or swapped for another item
    assert np.array_equal(test.candidate, data.user_start[test.user + 1] - 1)
    swapped = test.negative_item >= 0
    assert 0.3 < swapped.mean() < 0.7
    assert np.all(test.negative_item[swapped] != data.item_rows[test.candidate[swapped]])
    assert np.all(test.negative_item[swapped] >= 2)
    # test users are disjoint from the others; validation is each training user's final event,
    # later than every training window of that user (the reference's training users, all of them)
    groups = {k: set(data.splits[k].user.tolist()) for k in ("train", "validation", "test")}
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert groups["validation"] == groups["train"] == set(np.flatnonzero((last_time <= split) & (n > 10)).tolist())
    val, train = data.splits["validation"], data.splits["train"]
    assert np.array_equal(val.candidate, data.user_start[val.user + 1] - 1)
    latest_train = np.full(len(n), -1)
    np.maximum.at(latest_train, train.user, train.candidate)
    assert np.all(latest_train[val.user] < val.candidate)
    # no windows for users with fewer than 10 events; windows stay within the user and before the end
    for name in ("train", "validation"):
        s = data.splits[name]
        assert np.all(n[s.user] >= 10)
        assert np.all(last_time[s.user] <= split)
        assert np.all(s.candidate >= data.user_start[s.user])
        assert np.all(s.candidate < data.user_start[s.user + 1])
        pos = s.negative_item < 0
        if name == "train":
            assert np.all(s.candidate < data.user_start[s.user + 1] - 1)  # never the final (validation) event
        assert pos.sum() == (~pos).sum()
        per_user = np.bincount(s.user[pos], minlength=len(n))
        assert per_user.max() <= 10
    check_collate(data, data.splits["train"])
    check_collate(data, test)


def test_reference_short_user_gives_no_windows():
    rows, t = [], 1_600_000_000
    # 10 users; user 1 has 9 events, all early, so it is on the training side of the split
    for u in range(10):
        count = 9 if u == 1 else 40
        end = t + (1_000 if u == 1 else 100_000 * (u + 2))
        for k in range(count):
            rows.append((u + 1, 1_000 * u + k + 1, k % 5 + 1, 1, end - 60 * (count - k)))
    user, item, cat, beh, ts = (np.array(c, dtype=np.int64) for c in zip(*rows))
    log = EventLog(user, item, cat, beh.astype(np.int8), ts)
    for seed in range(4):
        data = prepare(log, protocol="reference", seed=seed)
        short = int(data.users.lookup(np.array([2]))[0])
        assert short not in set(data.splits["test"].user.tolist())
        assert short not in set(data.splits["train"].user.tolist())
        assert short not in set(data.splits["validation"].user.tolist())
        # the 40-event training users do give windows
        assert len(data.splits["train"]) > 0


# ---------------------------------------------------------------- fingerprint, save/load


def test_fingerprint_tracks_samples(synthetic_events):
    a = prepare(synthetic_events, protocol="holdout", seed=1)
    b = prepare(synthetic_events, protocol="holdout", seed=1)
    c = prepare(synthetic_events, protocol="holdout", seed=2)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    d = prepare(synthetic_events, protocol="reference", seed=1)
    assert d.fingerprint() != a.fingerprint()
    # one changed sample changes it
    train = b.splits["train"]
    train.candidate = train.candidate.copy()
    train.candidate[0] -= 1
    assert b.fingerprint() != a.fingerprint()
    # dropping a sample changes it
    e = prepare(synthetic_events, protocol="holdout", seed=1)
    e.splits["validation"] = e.splits["validation"].take(np.arange(len(e.splits["validation"]) - 1))
    assert e.fingerprint() != a.fingerprint()
    # re-computing is stable
    assert a.fingerprint() == a.fingerprint()


@pytest.mark.parametrize("protocol", ["holdout", "reference"])
def test_save_load_round_trip(tmp_path, synthetic_events, protocol):
    data = prepare(synthetic_events, protocol=protocol, seed=4)
    path = tmp_path / "sub" / "data.npz"
    data.save(path)
    assert path.exists() and not list(path.parent.glob("*.tmp*"))
    loaded = PreparedData.load(path)
    assert loaded.fingerprint() == data.fingerprint()
    assert loaded.info == data.info
    assert loaded.table_sizes() == data.table_sizes()
    for name in ("item_rows", "cat_rows", "behaviors", "timestamps", "item_category", "user_start"):
        assert np.array_equal(getattr(loaded, name), getattr(data, name)), name
        assert getattr(loaded, name).dtype == getattr(data, name).dtype, name
    assert set(loaded.splits) == set(data.splits)
    for name, s in data.splits.items():
        t = loaded.splits[name]
        for f in ("user", "candidate", "negative_item"):
            assert np.array_equal(getattr(s, f), getattr(t, f))
        ba, bb = data.collate(s, HIST), loaded.collate(t, HIST)
        for f in ("user_rows", "item_rows", "cat_rows", "behaviors", "timestamps", "labels"):
            assert torch.equal(getattr(ba, f), getattr(bb, f)), (name, f)
    assert np.array_equal(loaded.items.lookup(synthetic_events.item[:50]), data.items.lookup(synthetic_events.item[:50]))


def test_prepare_rejects_empty_and_unknown_protocol(synthetic_events):
    with pytest.raises(ValueError, match="protocol"):
        prepare(synthetic_events, protocol="bogus")
    empty = synthetic_events.take(np.zeros(len(synthetic_events), bool))
    with pytest.raises(ValueError, match="empty"):
        prepare(empty)
