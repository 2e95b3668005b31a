"""What goes into one user's slice: the shard policy's items (`sdk_builder.shard`) and the
categories that fit the layout's category capacity."""

from __future__ import annotations

import numpy as np

from model.tbsm import RESERVED_ROWS
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import MAX_HISTORY
from sdk_builder.program import Shard, SliceLayout
from sdk_builder.shard import DEFAULT_SLACK, ShardIndex, policy_positions, shard_neighbors


def select_shard(data: PreparedData, index: ShardIndex, layout: SliceLayout, user_row: int,
                 prior_scale: float = 0.0, previous: np.ndarray | None = None,
                 slack: float = DEFAULT_SLACK) -> tuple[Shard, dict[str, int]]:
    """The user's shard and how many items each source contributed (+ categories over capacity).
    `prior_scale` > 0 adds that times the policy's prior to each item's (scaled) logit on the phone.
    `previous`, `slack`: the user's previous shard (item rows) and the hysteresis (sdk_builder.shard)."""
    sl = data.user_events(user_row)
    items, cats = data.item_rows[sl], data.cat_rows[sl]
    ranked, sources = index.select_ranked(items, cats, previous, slack)
    category_rows, over = select_categories(cats[-MAX_HISTORY:], data.item_category[ranked],
                                            layout.category_rows - RESERVED_ROWS)
    sources["categories_over_capacity"] = over
    built_after = int(data.timestamps[sl][-1]) if len(items) else 0
    return shard_of(index, layout, user_row, ranked, category_rows, prior_scale, built_after), sources


def shard_of(index: ShardIndex, layout: SliceLayout, user_row: int, ranked: np.ndarray, category_rows: np.ndarray,
             prior_scale: float, built_after: int = 0) -> Shard:
    """The Shard of items in the policy's order `ranked`: their build-time positions and their
    co-visit lists inside the shard, with which the program re-ranks from events after `built_after`."""
    item_rows, positions = policy_positions(ranked)
    neighbors, counts = shard_neighbors(index, item_rows, layout.neighbors)
    return Shard(user_row, item_rows, category_rows, positions, neighbors, counts, float(prior_scale), built_after)


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
