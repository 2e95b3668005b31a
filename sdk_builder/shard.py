"""Which items go into a user's bundle: the shard policy and its coverage measure.

A shard is what the phone can score or see in its history. It is filled, deduplicated, in order:
1. `recent`: the user's own most recent distinct items (the on-device history needs their rows);
2. `covisit`: items that other users interacted with shortly after the user's recent items;
3. `category`: the most popular items of the categories the user has been browsing lately;
4. `popular`: globally popular items, to fill the rest.
Each source gets a share of the shard (`weights`); space a source cannot use passes to the next.
Deterministic: every ranking breaks ties by item row.

Hysteresis: given the user's previous shard, its items compete for the shard as if they ranked
(1 + slack) times higher in the policy's order, so a rebuilt bundle differs from the old one by
fewer rows and its patch is smaller (an item new to the shard costs its rows as literal bytes),
while a new item still gets in when it outranks an old one by that factor. The user's own recent
items always get in. The kept items keep their places in the policy's order (and so their prior).
The shard items' co-visit lists are kept the same way (`shard_neighbors`): an old neighbour stays
unless a new one has more than (1 + NEIGHBOR_SLACK) times its count, and a count keeps its old
one-byte code while it stays within one code of it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from model.tbsm import RESERVED_ROWS
from sdk_builder.data.dataset import PreparedData
from sdk_builder.util import sorted_lookup

# Previous shard items compete as if ranked (1 + slack) times higher (benchmarks/delta.py measures
# patch bytes and next-day coverage for several values).
DEFAULT_SLACK = 4.0
# Co-visit counts are small integers, and a day of events reorders many equal ones: without this,
# most lists of a rebuilt shard change (ml-latest-small: 600 of 950) though few counts moved much.
NEIGHBOR_SLACK = 1.0
CODE_SLACK = 1  # codes are 8 per doubling: a kept code is within ~9% of the count's own


@dataclass(frozen=True)
class ShardPolicy:
    shard_size: int = 1000
    recent_items: int = 50  # own distinct items, most recent first
    covisit_window: int = 20  # b co-visits a when b follows a within this many events of one user
    covisit_seeds: int = 50  # the user's most recent distinct items used as co-visit seeds
    category_events: int = 50  # recent events whose categories define the user's interests
    weights: dict[str, float] = field(default_factory=lambda: {"recent": 0.05, "covisit": 0.65, "category": 0.15, "popular": 0.15})
    # Skip the user's older items (beyond the on-device history) when users rarely come back to an
    # item: None decides from the data (repeat rate below `repeat_threshold`).
    exclude_seen: bool | None = None
    repeat_threshold: float = 0.1
    history: int = 20
    # Co-visit list length per shard item in a bundle: the program re-ranks the shard from the
    # phone's own events with them (`sdk_builder.program.live_positions`); 4 bytes an entry.
    neighbors: int = 8
    name: str = "recent+covisit+category+popular"

    def to_dict(self) -> dict:
        return asdict(self)


class ShardIndex:
    """Global statistics the policy needs, built once per dataset (optionally from a subset of events)."""

    def __init__(self, data: PreparedData, policy: ShardPolicy, event_mask: np.ndarray | None = None) -> None:
        self.policy = policy
        self.data = data
        n_items = data.items.rows
        keep = np.ones(data.num_events, bool) if event_mask is None else event_mask
        counts = np.bincount(data.item_rows[keep], minlength=n_items)
        counts[:RESERVED_ROWS] = 0
        # Popularity order, ties by row: lexsort's last key is the primary one.
        self.popular = np.lexsort((np.arange(n_items), -counts))[: int((counts > 0).sum())]
        self.popularity = counts
        cat_of_popular = data.item_category[self.popular]
        order = np.argsort(cat_of_popular, kind="stable")
        self.cat_items = self.popular[order]
        self.cat_offsets = np.searchsorted(cat_of_popular[order], np.arange(data.categories.rows + 1))
        self._build_covisit(keep)
        self.repeat_rate = _repeat_rate(data, keep)
        self.exclude_seen = policy.exclude_seen if policy.exclude_seen is not None else self.repeat_rate < policy.repeat_threshold

    def _build_covisit(self, keep: np.ndarray, per_item: int = 200) -> None:
        data, n_items = self.data, self.data.items.rows
        user_of_event = data.user_of_event()
        keys = []
        for lag in range(1, self.policy.covisit_window + 1):
            a = np.arange(data.num_events - lag)
            b = a + lag
            ok = (user_of_event[a] == user_of_event[b]) & keep[a] & keep[b]
            ia, ib = data.item_rows[a[ok]], data.item_rows[b[ok]]
            ok2 = ia != ib
            keys.append(ia[ok2] * n_items + ib[ok2])
        pairs, counts = np.unique(np.concatenate(keys) if keys else np.zeros(0, np.int64), return_counts=True)
        src, dst = pairs // n_items, pairs % n_items
        order = np.lexsort((dst, -counts, src))
        src, dst, counts = src[order], dst[order], counts[order]
        rank = np.arange(len(src)) - np.searchsorted(src, src)  # position within its source item
        top = rank < per_item
        self.cov_src, self.cov_dst, self.cov_count = src[top], dst[top], counts[top]
        self.cov_offsets = np.searchsorted(self.cov_src, np.arange(n_items + 1))

    def local_rows(self, items: np.ndarray) -> np.ndarray:
        """int64 [item rows]: the position of each row in `items`, -1 for rows not in it. One table
        reused from call to call (only `items`' rows are written, and cleared at the next call):
        a lookup per co-visit entry instead of a binary search (~200 entries per shard item). Not for
        concurrent calls from several threads."""
        table = getattr(self, "_local_rows", None)
        if table is None:
            table = self._local_rows = np.full(self.data.items.rows, -1, np.int64)
            self._local_rows_set = np.zeros(0, np.int64)
        table[self._local_rows_set] = -1
        table[items] = np.arange(len(items))
        self._local_rows_set = np.array(items, np.int64)
        return table

    def select(self, history_items: np.ndarray, history_cats: np.ndarray, previous: np.ndarray | None = None,
               slack: float = DEFAULT_SLACK) -> tuple[np.ndarray, dict[str, int]]:
        """Shard item rows (sorted) for a user whose events so far are given oldest first."""
        chosen, sources = self.select_ranked(history_items, history_cats, previous, slack)
        return np.sort(chosen), sources

    def select_ranked(self, history_items: np.ndarray, history_cats: np.ndarray, previous: np.ndarray | None = None,
                      slack: float = DEFAULT_SLACK) -> tuple[np.ndarray, dict[str, int]]:
        """`select`'s items in the policy's own order (source by source, each ranked): a ranking
        without a model, the baseline a bundle's model must beat. With `previous` (the item rows of
        the user's previous shard): the hysteresis of the module docstring; `sources` then also
        counts under "previous" the kept items the policy alone would have dropped."""
        size = self.policy.shard_size
        ranked, sources = self._policy_order(history_items, history_cats, size)
        if previous is None or slack <= 0 or not len(ranked):
            return ranked, sources
        longer, _ = self._policy_order(history_items, history_cats, int(round(size * (1.0 + slack))))
        # The policy's order, continued past the shard by the longer shard's other items.
        order = np.concatenate([ranked, longer[~np.isin(longer, ranked)]])[: len(longer)]
        position = np.arange(len(order), dtype=np.float64)
        incumbent = np.isin(order, previous)
        # An item of the previous shard competes as if it ranked (1 + slack) times higher: it stays
        # until newcomers outrank it by that factor, so the policy's top new items still get in.
        key = np.where(incumbent, position / (1.0 + slack), position)
        key[: sources.get("recent", 0)] = -2.0  # the on-device history needs their rows
        chosen = np.sort(np.lexsort((position, key))[:size])  # indices into order, back in the policy's order
        chosen = order[chosen]
        displaced = ~np.isin(ranked, chosen)
        if displaced.any():
            source_of = np.repeat(np.arange(len(sources)), list(sources.values()))  # `ranked` is source by source
            lost = np.bincount(source_of[displaced], minlength=len(sources))
            sources = {name: count - int(n) for (name, count), n in zip(sources.items(), lost)}
            sources["previous"] = int(displaced.sum())
        return chosen, sources

    def _policy_order(self, history_items: np.ndarray, history_cats: np.ndarray,
                      size: int) -> tuple[np.ndarray, dict[str, int]]:
        p = self.policy
        chosen = np.zeros(0, np.int64)
        excluded = np.zeros(0, np.int64)
        sources: dict[str, int] = {}
        carry = 0.0

        def take(name: str, ranked: np.ndarray) -> None:
            nonlocal chosen, carry
            wanted = p.weights.get(name, 0.0) * size + carry
            quota = min(int(round(wanted)), size - len(chosen))
            # Only a prefix can be needed: the quota plus everything that may be filtered out.
            ranked = ranked[: quota + len(chosen) + len(excluded)]
            ranked = ranked[ranked >= RESERVED_ROWS]
            _, first = np.unique(ranked, return_index=True)
            ranked = ranked[np.sort(first)]
            ranked = ranked[~np.isin(ranked, chosen) & ~np.isin(ranked, excluded)][: max(quota, 0)]
            chosen = np.concatenate([chosen, ranked])
            carry = max(0.0, wanted - len(ranked))
            sources[name] = int(len(ranked))

        recent = _distinct_most_recent(history_items)
        if self.exclude_seen:
            # Items the user will not come back to only need rows while in the on-device history.
            take("recent", _distinct_most_recent(history_items[-p.history :]))
            excluded = recent
        else:
            take("recent", recent[: p.recent_items])
        take("covisit", self._covisit_ranking(recent[: p.covisit_seeds]))
        take("category", self._category_ranking(history_cats[-p.category_events :]))
        carry = float(size)  # whatever is left goes to popular items
        take("popular", self.popular)
        return chosen, sources

    def _covisit_ranking(self, seeds: np.ndarray) -> np.ndarray:
        if not len(seeds):
            return np.zeros(0, np.int64)
        # More recent seeds count more: weight 1 / (1 + age rank).
        parts, scores = [], []
        for age, seed in enumerate(seeds.tolist()):
            lo, hi = self.cov_offsets[seed], self.cov_offsets[seed + 1]
            parts.append(self.cov_dst[lo:hi])
            scores.append(self.cov_count[lo:hi] / (1.0 + age))
        items = np.concatenate(parts)
        if not len(items):
            return items
        uniq, inverse = np.unique(items, return_inverse=True)
        total = np.bincount(inverse, weights=np.concatenate(scores))
        return uniq[np.lexsort((uniq, -total))]

    def _category_ranking(self, recent_cats: np.ndarray) -> np.ndarray:
        """Interleave each recent category's popular items, in proportion to its share."""
        cats = recent_cats[recent_cats >= RESERVED_ROWS]
        if not len(cats):
            return np.zeros(0, np.int64)
        uniq, counts = np.unique(cats, return_counts=True)
        share = counts / counts.sum()
        keys, items = [], []
        for cat, s in zip(uniq.tolist(), share.tolist()):
            members = self.cat_items[self.cat_offsets[cat] : self.cat_offsets[cat + 1]]
            items.append(members)
            keys.append((np.arange(len(members)) + 1) / s)  # k-th item of a category with share s
        items_all, keys_all = np.concatenate(items), np.concatenate(keys)
        return items_all[np.lexsort((items_all, keys_all))]


def _repeat_rate(data: PreparedData, keep: np.ndarray) -> float:
    """Fraction of (kept) events whose item the same user had already interacted with."""
    keys = data.user_of_event()[keep] * data.items.rows + data.item_rows[keep]
    return 1.0 - len(np.unique(keys)) / max(len(keys), 1)


def _distinct_most_recent(items: np.ndarray) -> np.ndarray:
    reversed_items = items[::-1]
    _, first = np.unique(reversed_items, return_index=True)
    return reversed_items[np.sort(first)]


def user_history(data: PreparedData, user_row: int, upto: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    sl = data.user_events(user_row)
    end = sl.stop if upto is None else sl.start + upto
    return data.item_rows[sl.start : end], data.cat_rows[sl.start : end]


def coverage(data: PreparedData, policy: ShardPolicy, held_out: int = 10) -> dict[str, float]:
    """Leave-last-`held_out`-out: the fraction of each user's held-out events whose item is in the
    shard built from the data before them, for this policy and for the global-popular baseline."""
    n = np.diff(data.user_start)
    users = np.flatnonzero(n > held_out)
    user_of_event = data.user_of_event()
    position = np.arange(data.num_events) - data.user_start[user_of_event]
    before = position < (n[user_of_event] - held_out)
    index = ShardIndex(data, policy, event_mask=before)
    baseline = set(index.popular[: policy.shard_size].tolist())
    hits = base_hits = total = 0
    for u in users.tolist():
        items, cats = user_history(data, u, upto=int(n[u]) - held_out)
        shard, _ = index.select(items, cats)
        future = data.item_rows[data.user_start[u + 1] - held_out : data.user_start[u + 1]]
        hits += int(np.isin(future, shard).sum())
        base_hits += sum(int(i) in baseline for i in future.tolist())
        total += len(future)
    ours, base = hits / max(total, 1), base_hits / max(total, 1)
    return {"users": int(len(users)), "held_out_events": int(total), "policy_coverage": ours,
            "popular_coverage": base, "ratio": ours / base if base else float("inf")}


def hysteresis_coverage(data: PreparedData, policy: ShardPolicy, before_previous: np.ndarray, before: np.ndarray,
                        target: np.ndarray, slacks: tuple[float, ...]) -> dict[float, dict[str, float]]:
    """What hysteresis costs in coverage: for each user with `target` events, the previous shard is
    cut from the events in `before_previous`, the new one from those in `before` (each mask a prefix
    of every user's events) with each slack (0: no hysteresis); per slack, the fraction of target
    events whose item the new shard holds and the mean number of items new to the shard."""
    index_previous = ShardIndex(data, policy, event_mask=before_previous)
    index = ShardIndex(data, policy, event_mask=before)
    hits = {slack: 0 for slack in slacks}
    churn = {slack: 0 for slack in slacks}
    users = total = 0
    for u in np.unique(data.user_of_event()[target]).tolist():
        sl = data.user_events(u)
        items, cats = data.item_rows[sl], data.cat_rows[sl]
        old_mask, new_mask = before_previous[sl], before[sl]
        if not new_mask.any():
            continue
        previous, _ = index_previous.select(items[old_mask], cats[old_mask])
        future = items[target[sl]]
        for slack in slacks:
            shard, _ = index.select(items[new_mask], cats[new_mask], previous, slack)
            hits[slack] += int(np.isin(future, shard).sum())
            churn[slack] += int((~np.isin(shard, previous)).sum())
        users += 1
        total += len(future)
    return {slack: {"users": users, "target_events": total, "coverage": hits[slack] / max(total, 1),
                    "new_items": churn[slack] / max(users, 1)} for slack in slacks}


def policy_positions(ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted shard items, each one's position in the policy order, 0 for its first item)."""
    order = np.argsort(ranked, kind="stable")
    return ranked[order], order


def policy_prior(ranked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted shard items, their prior): -log(1 + position in the policy order), the policy's
    own ranking as a score the model's logit can be blended with (0 for its first item)."""
    items, positions = policy_positions(ranked)
    return items, -np.log1p(positions.astype(np.float64)).astype(np.float32)


# Co-visit counts are stored as one byte, 8 codes per doubling (`encode_counts`): a count within
# ~4.4% of the stored value, 1 byte instead of 2, and a code that stays put when a count moves a
# little (a day's new events change few codes: smaller patches). Code q decodes to COUNT_DECODE[q],
# integers in 16ths, so that the program (`sdk_builder.program.live_positions`) and the eager reference sum exactly the same numbers.
MAX_COUNT_CODE = 128  # counts up to ~55,000 (keeps `live_positions`' sort keys inside int64)
COUNT_DECODE = np.array([0] + [round(16 * 2 ** ((q - 1) / 8)) for q in range(1, MAX_COUNT_CODE + 1)], np.int32)


def encode_counts(counts: np.ndarray) -> np.ndarray:
    """uint8 codes of co-visit counts: 0 for none, else 1 + round(8 log2(count)), at most MAX_COUNT_CODE."""
    counts = np.asarray(counts, np.float64)
    codes = 1 + np.round(8 * np.log2(np.maximum(counts, 1)))
    return np.where(counts > 0, np.minimum(codes, MAX_COUNT_CODE), 0).astype(np.uint8)


@dataclass(frozen=True)
class PreviousLists:
    """The co-visit lists of a user's previous bundle: each item's neighbours (full rows, 0-padded)
    and their count codes, [n_old, k], for the items `item_rows` (full rows)."""

    item_rows: np.ndarray
    neighbors: np.ndarray
    codes: np.ndarray

    def entries(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted (item, neighbour) pair keys, their codes) of every listed pair."""
        owner = np.repeat(np.asarray(self.item_rows, np.int64), self.neighbors.shape[1]).reshape(self.neighbors.shape)
        listed = self.neighbors >= RESERVED_ROWS
        keys = _pair_keys(owner[listed], self.neighbors[listed])
        order = np.argsort(keys, kind="stable")
        return keys[order], self.codes[listed][order]


def _pair_keys(items: np.ndarray, neighbors: np.ndarray) -> np.ndarray:
    return np.asarray(items, np.int64) << 32 | np.asarray(neighbors, np.int64)


def shard_neighbors(index: ShardIndex, shard_items: np.ndarray, k: int,
                    previous: PreviousLists | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each shard item's `k` most co-visited items inside the shard, the phone's own co-visit lists:
    (local rows int64 [n, k], count codes uint8 [n, k] (`encode_counts`)), by count then row, 0-padded.
    `shard_items` are the shard's sorted full rows (local row of shard_items[i] is i + RESERVED_ROWS).
    With `previous` (the previous bundle's lists), the hysteresis of the module docstring."""
    n = len(shard_items)
    neighbors = np.zeros((n, k), np.int64)
    codes = np.zeros((n, k), np.uint8)
    if not n or not k:
        return neighbors, codes
    lo, hi = index.cov_offsets[shard_items], index.cov_offsets[shard_items + 1]
    lengths = hi - lo
    owner = np.repeat(np.arange(n), lengths)
    # Each item's entries lo..hi-1, all at once: the running index minus where its run starts, plus lo.
    entries = np.arange(len(owner)) + np.repeat(lo - (np.cumsum(lengths) - lengths), lengths)
    dst = index.cov_dst[entries]
    pos = index.local_rows(shard_items)[dst]
    inside = pos >= 0
    # The global lists are ordered by count, then row, within each source: keep that order.
    owner, local, count = owner[inside], pos[inside] + RESERVED_ROWS, index.cov_count[entries[inside]]
    code = encode_counts(count)
    if previous is not None and len(owner):
        old_keys, old_codes = previous.entries()
        at, listed = sorted_lookup(old_keys, _pair_keys(shard_items[owner], dst[inside]))
        old_code = np.where(listed, old_codes[np.minimum(at, len(old_keys) - 1)], 0) if len(old_keys) else np.zeros_like(code)
        keep_code = listed & (np.abs(code.astype(np.int64) - old_code) <= CODE_SLACK)
        code = np.where(keep_code, old_code, code).astype(np.uint8)
        strength = count * np.where(listed, 1.0 + NEIGHBOR_SLACK, 1.0)
        # Within each owner: strength, then old neighbours first (they win ties), then the global order.
        order = np.lexsort((np.arange(len(owner)), ~listed, -strength, owner))
        owner, local, code = owner[order], local[order], code[order]
    rank = np.arange(len(owner)) - np.searchsorted(owner, owner)
    top = rank < k
    neighbors[owner[top], rank[top]] = local[top]
    codes[owner[top], rank[top]] = code[top]
    return neighbors, codes
