"""Synthetic Taobao-style event logs with learnable sequential structure.

Each item belongs to one category and is Zipf-popular within it. Each user has a few preferred
categories whose mix drifts over the user's history; a Markov "current interest" switches among
them (mostly at session starts, rarely to a random category), the next item comes from the current
interest, and some events revisit a recent item. A sequence model can use the recent categories and
items; a popularity baseline cannot. Everything is vectorised over all events.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from sdk_builder.data.events import BEHAVIORS, EventLog

_PREFERRED = 4  # preferred categories per user
_P_SWITCH_IN_SESSION = 0.06
_P_SWITCH_NEW_SESSION = 0.5
_P_EXPLORE = 0.05  # a switch goes to a category outside the preferred ones
_P_REPEAT = 0.25
_MAX_REPEAT_LAG = 8
_P_NEW_SESSION = 0.12
# Behaviour mix of fresh vs revisited items (pv, buy, cart, fav); revisits convert more often.
_BEHAVIOR_P_FRESH = np.array([0.90, 0.015, 0.05, 0.035])
_BEHAVIOR_P_REPEAT = np.array([0.76, 0.06, 0.11, 0.07])


def generate_taobao_events(
    n_users: int,
    *,
    n_items: int = 20_000,
    n_categories: int = 200,
    events_per_user: tuple[int, int] = (20, 120),
    seed: int = 0,
    start: int = 1511568000,
    days: int = 9,
) -> EventLog:
    """Events of ``n_users`` users, sorted by (user, timestamp); identical for identical arguments.

    Ids are non-contiguous: users drawn from 1..1e7, items and categories from 1..5e6 (ranges grow
    if more ids are requested). Events per user are uniform in ``events_per_user`` (inclusive);
    timestamps are strictly increasing per user within [start, start + days * 86400).
    """
    lo, hi = events_per_user
    if n_users < 0 or not 1 <= n_categories <= n_items or not 1 <= lo <= hi or days < 1:
        raise ValueError("need n_users >= 0, 1 <= n_categories <= n_items, 1 <= min <= max events, days >= 1")
    window = days * 86_400
    if hi >= window:
        raise ValueError(f"{hi} events per user do not fit in {days} day(s) at one event per second")
    rng = np.random.default_rng(seed)

    # Catalogue: items sorted by category, rank 0 = most popular in its category.
    cat_weight = _zipf_weights(n_categories, 0.8)
    cat_size = 1 + rng.multinomial(n_items - n_categories, cat_weight)
    cat_start = np.cumsum(cat_size) - cat_size
    item_cat = np.repeat(np.arange(n_categories), cat_size)
    item_ids = _sparse_ids(rng, n_items, 5_000_000)
    cat_ids = _sparse_ids(rng, n_categories, 5_000_000)
    user_ids = np.sort(_sparse_ids(rng, n_users, 10_000_000))

    length = rng.integers(lo, hi + 1, n_users)
    n = int(length.sum())
    first = np.cumsum(length) - length
    user = np.repeat(np.arange(n_users), length)
    pos = np.arange(n) - first[user]
    frac = pos / np.maximum(length[user] - 1, 1)

    new_session = (pos == 0) | (rng.random(n) < _P_NEW_SESSION)
    offset = _session_offsets(rng, new_session, user, first, length, pos, window)

    # Interest: switches happen at every user's first event, so forward-filling never crosses users.
    p_switch = np.where(new_session, _P_SWITCH_NEW_SESSION, _P_SWITCH_IN_SESSION)
    switch = (pos == 0) | (rng.random(n) < p_switch)
    at = np.flatnonzero(switch)
    preferred = rng.choice(n_categories, size=(n_users, _PREFERRED), p=cat_weight)
    # Linear drift of each preference's logit over the user's history.
    bias = rng.normal(0.0, 1.0, (n_users, _PREFERRED))
    slope = rng.normal(0.0, 3.0, (n_users, _PREFERRED))
    logits = bias[user[at]] + slope[user[at]] * frac[at, None]
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(prob / prob.sum(axis=1, keepdims=True), axis=1)
    slot = np.minimum((rng.random((len(at), 1)) > cdf).sum(axis=1), _PREFERRED - 1)
    chosen = preferred[user[at], slot]
    explore = rng.random(len(at)) < _P_EXPLORE
    chosen[explore] = rng.choice(n_categories, size=int(explore.sum()), p=cat_weight)
    interest = np.zeros(n, np.int64)
    interest[at] = chosen
    interest = interest[np.maximum.accumulate(np.where(switch, np.arange(n), 0))]

    # Fresh item: continuous Zipf(1) rank within the interest category.
    size = cat_size[interest]
    rank = np.minimum(np.floor(np.power(size + 1.0, rng.random(n)) - 1).astype(np.int64), size - 1)
    item = cat_start[interest] + rank

    # Revisit: copy the item of an event up to _MAX_REPEAT_LAG back; pointer jumping resolves chains.
    repeat = (pos > 0) & (rng.random(n) < _P_REPEAT)
    lag = 1 + np.floor(rng.random(n) * np.minimum(pos, _MAX_REPEAT_LAG)).astype(np.int64)
    source = np.where(repeat, np.arange(n) - lag, np.arange(n))
    while True:
        deeper = source[source]
        if np.array_equal(deeper, source):
            break
        source = deeper
    item = item[source]

    u = rng.random(n)
    code = np.where(
        repeat,
        np.searchsorted(np.cumsum(_BEHAVIOR_P_REPEAT), u, side="right"),
        np.searchsorted(np.cumsum(_BEHAVIOR_P_FRESH), u, side="right"),
    )
    behavior = (np.minimum(code, len(BEHAVIORS) - 1) + 1).astype(np.int8)

    return EventLog(
        user=user_ids[user],
        item=item_ids[item],
        category=cat_ids[item_cat[item]],
        behavior=behavior,
        timestamp=start + offset,
    )


def _zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.power(np.arange(1, n + 1), exponent)
    return w / w.sum()


def _sparse_ids(rng: np.random.Generator, n: int, span: int) -> np.ndarray:
    """n distinct ids from 1..max(span, 2n), in random order."""
    return rng.choice(max(span, 2 * n), size=n, replace=False).astype(np.int64) + 1


def _session_offsets(
    rng: np.random.Generator,
    new_session: np.ndarray,
    user: np.ndarray,
    first: np.ndarray,
    length: np.ndarray,
    pos: np.ndarray,
    window: int,
) -> np.ndarray:
    """Seconds since ``start``: ~1 min gaps within sessions, hours between, fitted into the window."""
    n = len(user)
    gap = np.where(
        new_session,
        rng.lognormal(np.log(6 * 3600), 1.0, n),
        rng.lognormal(np.log(60), 1.0, n),
    )
    gap[pos == 0] = 0.0
    total = np.cumsum(gap)
    elapsed = total - total[first][user]
    span = elapsed[first + length - 1]
    # Leave one second per event so adding ``pos`` makes timestamps strictly increasing.
    room = 0.98 * (window - length)
    scale = np.minimum(1.0, room / np.maximum(span, 1.0))
    offset = np.floor(elapsed * scale[user]).astype(np.int64) + pos
    last = offset[first + length - 1]
    begin = np.floor(rng.random(len(length)) * (window - last)).astype(np.int64)
    return begin[user] + offset


def write_taobao_csv(events: EventLog, path: str | os.PathLike, *, chunk_rows: int = 1_000_000) -> None:
    """Write a headerless Taobao UserBehavior CSV (behaviour as strings), chunk by chunk."""
    if len(events) and not (events.behavior.min() >= 1 and events.behavior.max() <= len(BEHAVIORS)):
        raise ValueError(f"behaviour codes must be in 1..{len(BEHAVIORS)}")
    names = pa.array(BEHAVIORS)
    schema = pa.schema(
        [
            ("user_id", pa.int64()),
            ("item_id", pa.int64()),
            ("category_id", pa.int64()),
            ("behavior", pa.dictionary(pa.int8(), pa.string())),
            ("timestamp", pa.int64()),
        ]
    )
    options = pcsv.WriteOptions(include_header=False, quoting_style="none")
    with pcsv.CSVWriter(path, schema, write_options=options) as writer:
        for lo in range(0, len(events), chunk_rows):
            part = slice(lo, lo + chunk_rows)
            codes = pa.array(events.behavior[part].astype(np.int8) - 1)
            writer.write_table(
                pa.table(
                    [
                        pa.array(events.user[part], pa.int64()),
                        pa.array(events.item[part], pa.int64()),
                        pa.array(events.category[part], pa.int64()),
                        pa.DictionaryArray.from_arrays(codes, names),
                        pa.array(events.timestamp[part], pa.int64()),
                    ],
                    schema=schema,
                )
            )
