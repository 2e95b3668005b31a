"""The on-device refresh measurement's protocol (issue 13 item 2): what each bundle may know."""

from __future__ import annotations

import numpy as np
import pytest

from model.tbsm import RESERVED_ROWS
from sdk_builder.data.dataset import extend_events
from sdk_builder.data.synthetic import generate_taobao_events
from sdk_builder.evaluation import gap_recovered, stream_split
from sdk_builder.ondevice import phone_events
from sdk_builder.shard import ShardIndex, ShardPolicy

STREAM, NEXT = 6, 4


def event_keys(users, items, timestamps) -> set[tuple[int, int, int]]:
    return set(zip(np.asarray(users).tolist(), np.asarray(items).tolist(), np.asarray(timestamps).tolist()))


def data_keys(data) -> set[tuple[int, int, int]]:
    """Events on items with a row (the others, on the OOV row, are counted by the caller)."""
    known = data.item_rows >= RESERVED_ROWS
    return event_keys(data.users.ids[data.user_of_event()][known], data.items.global_id(data.item_rows[known]),
                      data.timestamps[known])


def test_stream_protocol_keeps_targets_out_of_training_and_shards_and_the_stream_out_of_the_frozen_bundle():
    # Synthetic timestamps increase strictly per user and every item of the kept events has a row,
    # so (user, item, time) names one event and can be compared across the pieces.
    events = generate_taobao_events(120, n_items=1500, n_categories=20, events_per_user=(8, 40), seed=5)
    split = stream_split(events, stream=STREAM, next_events=NEXT, seed=1)
    data = split.data
    # The truth, from the raw log: per user (time order) the kept events, the stream, the next ones.
    order = np.lexsort((events.timestamp, events.user))
    user, item, stamp = events.user[order], events.item[order], events.timestamp[order]
    first = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    n = np.diff(np.r_[first, len(user)])
    position = np.arange(len(user)) - np.repeat(first, n)
    held = np.repeat(n > STREAM + NEXT, n)
    from_end = np.repeat(n, n) - position
    is_next = held & (from_end <= NEXT)
    is_stream = held & ~is_next & (from_end <= NEXT + STREAM)
    kept = ~is_next & ~is_stream
    assert is_next.any() and is_stream.any() and kept.any()

    # (a) and the checkpoint: exactly the kept events (no stream, no target event), in training,
    # the id maps, the samples and the shard statistics.
    assert data_keys(data) == event_keys(user[kept], item[kept], stamp[kept]) and data.num_events == kept.sum()
    assert set(data.items.ids.tolist()) == set(item[kept].tolist())
    for s in data.splits.values():
        assert np.all(s.candidate < data.user_start[s.user + 1])
    frozen = ShardIndex(data, ShardPolicy(shard_size=100))
    assert frozen.popularity.sum() == kept.sum()
    # The stream the phone sees is exactly the next STREAM events.
    assert event_keys(split.stream.user, split.stream.item, split.stream.timestamp) == \
        event_keys(user[is_stream], item[is_stream], stamp[is_stream])
    # (c): kept + stream, never a target event.
    rebuilt, counts = extend_events(data, split.stream, only_after_last=False)
    known = np.isin(item, data.items.ids)
    assert counts["added"] == is_stream.sum() and counts["unknown_item"] == (is_stream & ~known).sum() > 0
    assert data_keys(rebuilt) == event_keys(user[(kept | is_stream) & known], item[(kept | is_stream) & known],
                                            stamp[(kept | is_stream) & known])
    assert ShardIndex(rebuilt, ShardPolicy(shard_size=100)).popularity.sum() == ((kept | is_stream) & known).sum()

    # Targets: the next events' items that have a row and that the user touched neither before
    # nor in the stream; the phone ranks just before the first of them, from the streamed events.
    assert split.users and split.skipped_no_target + len(split.users) == len(np.flatnonzero(n > STREAM + NEXT))
    for u in split.users:
        uid = data.users.ids[u.user_row]
        mine = user == uid
        next_items = data.items.lookup(item[mine & is_next])
        earlier = data.items.lookup(item[mine & (kept | is_stream)])
        expected = np.unique(next_items[(next_items >= RESERVED_ROWS) & ~np.isin(next_items, earlier)])
        assert np.array_equal(u.targets, expected)
        assert u.request_time == stamp[mine & is_next].min()
        phone = phone_events(split, u, STREAM)
        assert [(e.item_id, e.timestamp) for e in phone[-STREAM:]] == list(zip(item[mine & is_stream].tolist(),
                                                                               stamp[mine & is_stream].tolist()))
        assert max(e.timestamp for e in phone) < u.request_time


def test_gap_recovered_is_the_share_of_the_gap_with_a_paired_interval():
    rng = np.random.default_rng(0)
    frozen = (rng.random(400) < 0.2).astype(float)
    rebuilt = np.maximum(frozen, rng.random(400) < 0.3)
    middle = np.where(rng.random(400) < 0.5, rebuilt, frozen)
    share, lo, hi = gap_recovered(frozen, middle, rebuilt)
    assert share == pytest.approx((middle.mean() - frozen.mean()) / (rebuilt.mean() - frozen.mean()))
    assert lo < share < hi and 0.3 < share < 0.7
    assert np.isnan(gap_recovered(frozen, middle, frozen)[0])
