"""The prior re-ranked on the phone: `live_positions` against a plain-Python reading of the policy's
tiers, and the shipped program (stamped, in the ExecuTorch runtime) following the history."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.tbsm import RESERVED_ROWS
from sdk_builder.formats import MAX_HISTORY
from sdk_builder.program import (SEED_WEIGHT, Shard, SliceLayout, live_positions, prior_tables, shard_prior, slice_constants,
                                 slice_constants_prior, user_state)
from sdk_builder.runtime import load_runtime_method
from sdk_builder.shard import CODE_SLACK, COUNT_DECODE, NEIGHBOR_SLACK, PreviousLists, encode_counts, shard_neighbors


def tiers_by_hand(hist, times, built_after, position, neighbors, counts):
    """The policy's tiers written out item by item: distinct history items latest first, then items
    co-visited after them by weighted count (ties by build-time position), then the build-time order. `counts` as
    stored: a count of c is 2 ** ((code - 1) / 8) in 16ths, rounded."""
    seeds, latest_seen = [], set()
    for item, time in zip(reversed(hist), reversed(times)):
        if item >= RESERVED_ROWS and item not in latest_seen and time > built_after:
            seeds.append(item)
        latest_seen.add(item)
    score: dict[int, int] = {}
    for age, seed in enumerate(seeds):
        for item, count in zip(neighbors[seed], counts[seed]):
            if item >= RESERVED_ROWS and count > 0 and item not in hist:
                decoded = round(16 * 2 ** ((int(count) - 1) / 8))
                score[item] = score.get(item, 0) + decoded * (SEED_WEIGHT // (1 + age))
    live = sorted(score, key=lambda i: (-score[i], position[i]))
    out = [len(seeds) + len(live) + int(p) for p in position]
    for k, item in enumerate(live):
        out[item] = len(seeds) + k
    for k, item in enumerate(seeds):
        out[item] = k
    return out


def test_count_codes_are_monotonic_and_within_a_twentieth():
    counts = np.arange(1, 200_000)
    codes = encode_counts(counts)
    decoded = COUNT_DECODE[codes] / 16
    assert encode_counts(np.zeros(3)).tolist() == [0, 0, 0] and codes.min() == 1
    assert np.all(np.diff(codes.astype(int)) >= 0) and np.all(np.diff(COUNT_DECODE[1:]) > 0)
    coded = decoded < COUNT_DECODE[-1] / 16  # below the largest code; above it counts saturate
    assert coded[:50_000].all() and codes[-1] == len(COUNT_DECODE) - 1
    assert np.max(np.abs(decoded[coded] / counts[coded] - 1)) < 0.05


@pytest.mark.parametrize("seed", range(12))
def test_live_positions_follow_the_policy_tiers(seed):
    rng = np.random.default_rng(seed)
    rows, k = 40, 4
    position = np.concatenate([[rows - 2, rows - 2], rng.permutation(rows - RESERVED_ROWS)])
    neighbors = rng.integers(0, rows, (rows, k))
    neighbors[:RESERVED_ROWS] = 0
    # Few distinct counts, so that equal scores (ties broken by build-time position) really occur.
    counts = encode_counts(rng.integers(0, 4, (rows, k)) * (neighbors >= RESERVED_ROWS))
    length = int(rng.integers(0, MAX_HISTORY + 1))
    hist = np.zeros(MAX_HISTORY, np.int64)
    hist[MAX_HISTORY - length :] = rng.integers(1, 12, length)  # OOV (1) and repeats included
    times = np.zeros(MAX_HISTORY, np.int64)
    times[MAX_HISTORY - length :] = np.sort(rng.integers(1000, 1100, length))
    built_after = int(rng.choice([0, 1050, 2000]))  # all, some or none of the events are after the build
    got = live_positions(torch.from_numpy(hist), torch.from_numpy(times), torch.tensor(built_after),
                         torch.from_numpy(position.astype(np.int16)),
                         torch.from_numpy(neighbors.astype(np.int16)), torch.from_numpy(counts), torch.from_numpy(COUNT_DECODE))
    assert got.tolist() == tiers_by_hand(hist.tolist(), times.tolist(), built_after, position, neighbors, counts)


def _live(hist, times, built_after, position, neighbors, codes):
    return live_positions(torch.from_numpy(hist), torch.from_numpy(times), torch.tensor(built_after),
                          torch.from_numpy(position.astype(np.int16)), torch.from_numpy(neighbors.astype(np.int16)),
                          torch.from_numpy(codes), torch.from_numpy(COUNT_DECODE)).tolist()


@pytest.mark.parametrize("seed", range(6))
def test_live_positions_seed_each_item_by_its_latest_event_even_out_of_time_order(seed):
    """The seeds are the items whose latest event (in history order) is fresh: with timestamps out of
    order an item's fresh event followed by an older one of the same item seeds nothing."""
    rng = np.random.default_rng(100 + seed)
    rows, k = 30, 3
    position = np.concatenate([[rows - 2, rows - 2], rng.permutation(rows - RESERVED_ROWS)])
    neighbors = rng.integers(RESERVED_ROWS, rows, (rows, k))
    neighbors[:RESERVED_ROWS] = 0
    codes = encode_counts(rng.integers(1, 4, (rows, k)) * (neighbors >= RESERVED_ROWS))
    hist = rng.integers(1, 8, MAX_HISTORY)  # few items: many repeats
    times = rng.integers(1000, 1100, MAX_HISTORY)  # unsorted
    got = _live(hist, times, 1050, position, neighbors, codes)
    assert got == tiers_by_hand(hist.tolist(), times.tolist(), 1050, position, neighbors, codes)


def test_live_positions_rank_every_seed_above_the_largest_co_visit_score():
    """Every entry of every list at the largest count code, on one item: its score is the largest a
    program can meet, and the 20 seeds still rank first, latest first (the sort keys stay in int64)."""
    rows, k = 60, 8
    position = np.concatenate([[rows - 2, rows - 2], np.arange(rows - RESERVED_ROWS)[::-1]])
    neighbors = np.full((rows, k), rows - 1)
    neighbors[:RESERVED_ROWS] = 0
    codes = np.where(neighbors > 0, len(COUNT_DECODE) - 1, 0).astype(np.uint8)
    hist = np.arange(RESERVED_ROWS, RESERVED_ROWS + MAX_HISTORY)
    times = np.arange(1, MAX_HISTORY + 1) + 1000
    got = _live(hist, times, 0, position, neighbors, codes)
    assert got == tiers_by_hand(hist.tolist(), times.tolist(), 0, position, neighbors, codes)
    assert got[hist[-1]] == 0 and got[hist[0]] == MAX_HISTORY - 1 and got[rows - 1] == MAX_HISTORY


def test_padding_entries_of_the_co_visit_lists_are_stored_with_code_0():
    """`live_positions` adds an entry's decoded count wherever it points, padding included: the
    stored lists carry code 0 on every padding entry, whatever the shard passed."""
    neighbors = np.array([[3, 0], [0, 0], [2, 0]])
    codes = np.array([[5, 7], [9, 9], [4, 1]], np.uint8)
    shard = Shard(0, np.arange(3), np.arange(2), np.arange(3), neighbors, codes)
    stored = slice_constants_prior(shard, SliceLayout.exact(shard))
    entries, weights = stored["item_neighbors"].numpy(), stored["neighbor_weights"].numpy()
    assert (weights[entries < RESERVED_ROWS] == 0).all()
    assert sorted(weights[entries >= RESERVED_ROWS].tolist()) == [4, 5]


def test_shard_neighbors_are_the_global_lists_inside_the_shard(builder):
    shard, _ = builder.shard_for(builder.user_row(int(builder.ckpt.users.ids[3])))
    index, items = builder.index, shard.item_rows
    neighbors, codes = shard_neighbors(index, items, 5)
    checked = 0
    for local, item in enumerate(items.tolist()):
        lo, hi = index.cov_offsets[item], index.cov_offsets[item + 1]
        inside = [(int(d), int(c)) for d, c in zip(index.cov_dst[lo:hi], index.cov_count[lo:hi]) if d in set(items.tolist())][:5]
        expected = [(int(np.searchsorted(items, d)) + RESERVED_ROWS, int(encode_counts(c))) for d, c in inside]
        got = [(int(n), int(c)) for n, c in zip(neighbors[local], codes[local]) if n]
        assert got == expected
        checked += bool(expected)
    assert checked > len(items) // 4


def test_a_rebuild_keeps_old_neighbours_and_codes_within_the_slack(builder):
    """Co-visit list hysteresis, against a by-hand reading: an old neighbour stays unless a new one
    has more than (1 + NEIGHBOR_SLACK) times its count (it wins ties), and a count within CODE_SLACK
    codes of its old code keeps that code."""
    shard, _ = builder.shard_for(builder.user_row(int(builder.ckpt.users.ids[3])))
    index, items, k = builder.index, shard.item_rows, 5
    in_shard = set(items.tolist())
    rng = np.random.default_rng(0)
    lists = {}
    for item in items.tolist():
        lo, hi = index.cov_offsets[item], index.cov_offsets[item + 1]
        lists[item] = [(int(d), int(c)) for d, c in zip(index.cov_dst[lo:hi], index.cov_count[lo:hi]) if d in in_shard]
    # The old lists: weaker entries (ranks 3..7 of today's) with codes off by -2..2.
    old_neighbors = np.zeros((len(items), k), np.int64)
    old_codes = np.zeros((len(items), k), np.uint8)
    for i, item in enumerate(items.tolist()):
        for j, (d, c) in enumerate(lists[item][3 : 3 + k]):
            old_neighbors[i, j] = d
            old_codes[i, j] = np.clip(int(encode_counts(c)) + int(rng.integers(-2, 3)), 1, 128)
    previous = PreviousLists(items, old_neighbors, old_codes)
    got, got_codes = shard_neighbors(index, items, k, previous)
    moved = recoded = 0
    for i, item in enumerate(items.tolist()):
        old = {int(d): int(c) for d, c in zip(old_neighbors[i], old_codes[i]) if d}
        ranked = sorted(enumerate(lists[item]), key=lambda e: (-e[1][1] * (1 + NEIGHBOR_SLACK if e[1][0] in old else 1),
                                                               e[1][0] not in old, e[0]))[:k]
        expected = []
        for _, (d, c) in ranked:
            code = int(encode_counts(c))
            expected.append((int(np.searchsorted(items, d)) + RESERVED_ROWS,
                             old[d] if d in old and abs(code - old[d]) <= CODE_SLACK else code))
            recoded += d in old and old[d] != code and abs(code - old[d]) <= CODE_SLACK
        assert [(int(n), int(c)) for n, c in zip(got[i], got_codes[i]) if n] == expected
        moved += [d for _, (d, _) in ranked] != [d for d, _ in lists[item][:k]]
    assert moved > len(items) // 10 and recoded > 0


def test_the_shipped_program_re_ranks_from_the_history_in_the_runtime(builder):
    """Stamped programs in the runtime: the prior they add (the logit of the score with prior_scale b
    minus that with b = 0, same history) is the eager re-ranked prior, and one event moves that
    item's co-visited items ahead of what led the build-time order."""
    user_row = builder.user_row(int(builder.ckpt.users.ids[5]))
    shard, _ = builder.shard_for(user_row)
    # The session's template (exporting again here would swap another export into the shared
    # builder, and a second export in one process need not be byte-identical to the first).
    assert builder.template is not None

    def stamped(scale):
        constants = slice_constants(builder.model, dataclasses.replace(shard, prior_scale=scale), builder.ckpt.item_category,
                                    builder.layout)
        return load_runtime_method(builder.template.stamp(constants))

    with_prior, without = stamped(0.9), stamped(0.0)
    has_list = np.flatnonzero(shard.neighbor_codes[:, 0] > 0)
    # The seed whose top co-visited item comes latest in the build-time order.
    seed = int(has_list[np.argmax(shard.item_position[shard.neighbors[has_list, 0] - RESERVED_ROWS])])
    target = int(shard.neighbors[seed, 0])
    leader = int(np.argmin(shard.item_position)) + RESERVED_ROWS
    candidates = torch.arange(RESERVED_ROWS, RESERVED_ROWS + len(shard.item_rows))
    zeros = torch.zeros(MAX_HISTORY, dtype=torch.long)
    state = user_state(builder.model, user_row)

    def runtime_prior(hist_items, hist_times):
        inputs = [hist_items, zeros, zeros, hist_times, torch.tensor([shard.built_after + 3600]), candidates, state]
        a, b = (torch.logit(m.execute(inputs)[0].to(torch.float64)) for m in (with_prior, without))
        return (a - b).numpy()

    history = zeros.clone()
    history[-1] = seed + RESERVED_ROWS
    after_build, before_build = zeros.clone(), zeros.clone()
    after_build[-1], before_build[-1] = shard.built_after + 60, shard.built_after
    tables = prior_tables(dataclasses.replace(shard, prior_scale=0.9))
    priors = {}
    for name, (hist, times) in {"empty": (zeros, zeros), "fresh": (history, after_build), "old": (history, before_build)}.items():
        priors[name] = shard_prior(tables, hist, times)
        np.testing.assert_allclose(runtime_prior(hist, times), priors[name][candidates].numpy(), atol=2e-4)
    assert shard.built_after > 0 and torch.equal(priors["old"], priors["empty"])  # the build already saw it
    before, after = priors["empty"], priors["fresh"]
    assert before[leader] > before[target] and after[target] > after[leader]
    assert after[target] == pytest.approx(-np.log1p(1) * 0.9, abs=1e-6)  # right after the one seed
