"""What goes into one user's slice: the shard policy's items (`sdk_builder.shard`) and the
categories that fit the layout's category capacity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from model.tbsm import RESERVED_ROWS
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import MAX_HISTORY
from sdk_builder.program import Shard, SliceLayout
from sdk_builder.shard import DEFAULT_SLACK, PreviousLists, ShardIndex, policy_positions, shard_neighbors
from sdk_builder.util import sorted_lookup


@dataclass(frozen=True)
class PreviousShard:
    """The user's previous bundle as a rebuild sees it: its items (full rows, in its local order) and,
    when its program could be read (`BundleBuilder.previous_shard`), each one's slot (`Shard.item_slot`)
    and its co-visit lists."""

    item_rows: np.ndarray
    item_slots: np.ndarray | None = None
    lists: PreviousLists | None = None


def select_shard(data: PreparedData, index: ShardIndex, layout: SliceLayout, user_row: int,
                 prior_scale: float = 0.0, previous: PreviousShard | None = None,
                 slack: float = DEFAULT_SLACK) -> tuple[Shard, dict[str, int]]:
    """The user's shard and how many items each source contributed (+ categories over capacity).
    `prior_scale` > 0 adds that times the policy's prior to each item's (scaled) logit on the phone.
    `previous`, `slack`: the user's previous shard and the hysteresis (sdk_builder.shard; slack 0:
    none, only the slots are kept)."""
    sl = data.user_events(user_row)
    items, cats = data.item_rows[sl], data.cat_rows[sl]
    ranked, sources = index.select_ranked(items, cats, previous.item_rows if previous is not None else None, slack)
    category_rows, over = select_categories(cats[-MAX_HISTORY:], data.item_category[ranked],
                                            layout.category_rows - RESERVED_ROWS)
    sources["categories_over_capacity"] = over
    built_after = int(data.timestamps[sl][-1]) if len(items) else 0
    if previous is not None and slack <= 0:
        previous = dataclasses.replace(previous, lists=None)  # the lists afresh too
    return shard_of(index, layout, user_row, ranked, category_rows, prior_scale, built_after, previous), sources


def shard_of(index: ShardIndex, layout: SliceLayout, user_row: int, ranked: np.ndarray, category_rows: np.ndarray,
             prior_scale: float, built_after: int = 0, previous: PreviousShard | None = None) -> Shard:
    """The Shard of items in the policy's order `ranked`: their build-time positions, their co-visit
    lists inside the shard (kept close to the previous shard's lists, if given), with which the
    program re-ranks from events after `built_after`, and their slots (the previous shard's, where
    it had them)."""
    item_rows, positions = policy_positions(ranked)
    neighbors, codes = shard_neighbors(index, item_rows, layout.neighbors, previous.lists if previous else None)
    return Shard(user_row, item_rows, category_rows, positions, neighbors, codes, float(prior_scale), built_after,
                 stable_slots(item_rows, previous))


def stable_slots(item_rows: np.ndarray, previous: PreviousShard | None) -> np.ndarray:
    """Each item's slot (int64, local order): an item of the previous shard keeps its slot where that
    fits this shard, the others take the free slots in ascending order (in local order). Without a
    previous shard, an item's slot is its local row."""
    n = len(item_rows)
    rows = np.arange(RESERVED_ROWS, RESERVED_ROWS + n, dtype=np.int64)
    if previous is None or previous.item_slots is None:
        return rows
    slots = previous_slots(item_rows, previous)
    fits = (slots >= RESERVED_ROWS) & (slots < RESERVED_ROWS + n)
    slots[~fits] = np.setdiff1d(rows, slots[fits])
    return slots


def previous_slots(item_rows: np.ndarray, previous: PreviousShard) -> np.ndarray:
    """Each item's slot in the previous shard, -1 where it was not in it."""
    old_rows, old_slots = np.asarray(previous.item_rows, np.int64), np.asarray(previous.item_slots, np.int64)
    if not len(old_rows):
        return np.full(len(item_rows), -1, np.int64)
    order = np.argsort(old_rows, kind="stable")
    pos, found = sorted_lookup(old_rows[order], item_rows)
    return np.where(found, old_slots[order[np.minimum(pos, len(order) - 1)]], -1)


def select_categories(history_cats: np.ndarray, item_cats: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Categories of the history events first (an event may carry another category than its item's),
    then those of the shard items by how many items use them, up to the capacity.
    Returns (sorted category rows, how many did not fit)."""
    history_cats = np.unique(history_cats)
    item_cats, counts = np.unique(item_cats, return_counts=True)
    ranked = item_cats[np.lexsort((item_cats, -counts))]
    ordered = np.concatenate([history_cats, ranked[~np.isin(ranked, history_cats)]])
    ordered = ordered[ordered >= RESERVED_ROWS]
    return np.sort(ordered[:capacity]), int(max(0, len(ordered) - capacity))
