"""From an event log to training samples: dense id maps, per-user event arrays, split protocols.

A sample is (user row, index of the candidate event in the user-sorted event arrays, negative item
row or -1). The history is the up to `history` events of that user before the candidate, left-padded;
a negative sample keeps the candidate's timestamp (the request time) and swaps in an item the user
never touched. Everything is numpy: no per-event Python objects.

`holdout_last=K` removes each user's last K events before anything else happens: they are kept
aside in `PreparedData.future` (for the on-device evaluation) and reach neither the id maps, the
samples, the popularity counts nor any shard built from the run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.tbsm import OOV_ROW, PADDING_ROW, RESERVED_ROWS

if TYPE_CHECKING:  # annotations only: events imports pyarrow (~0.8 s), which build and evaluate never need
    from sdk_builder.data.events import EventLog

PROTOCOLS = ("holdout", "reference")
# uniform: the reference's sampler (any item the user never touched); popularity: a mix of uniform
# and popularity-proportional draws, closer to the popular and co-visited items a shard holds.
NEGATIVE_SAMPLERS = ("uniform", "popularity")
POPULARITY_UNIFORM_MIX = 0.5


class DatasetError(ValueError):
    """A prepared dataset file that cannot be read; the message is one line."""


@dataclass(frozen=True)
class IdMap:
    """Sorted global ids; the row of ids[i] is i + first_row."""

    ids: np.ndarray
    first_row: int

    @property
    def rows(self) -> int:
        return len(self.ids) + self.first_row

    def lookup(self, global_ids: np.ndarray, unknown: int = OOV_ROW) -> np.ndarray:
        global_ids = np.asarray(global_ids, dtype=np.int64)
        pos = np.searchsorted(self.ids, global_ids)
        pos_clipped = np.minimum(pos, len(self.ids) - 1) if len(self.ids) else pos
        found = (pos < len(self.ids)) & (self.ids[pos_clipped] == global_ids) if len(self.ids) else pos < 0
        return np.where(found, pos + self.first_row, unknown).astype(np.int64)

    def global_id(self, rows: np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(rows) - self.first_row]


@dataclass
class SampleSet:
    user: np.ndarray  # int64 user rows
    candidate: np.ndarray  # int64 index into the event arrays
    negative_item: np.ndarray  # int64 item row, -1 for a positive

    def __len__(self) -> int:
        return len(self.user)

    @property
    def label(self) -> np.ndarray:
        return (self.negative_item < 0).astype(np.float32)

    def take(self, index: np.ndarray) -> SampleSet:
        return SampleSet(self.user[index], self.candidate[index], self.negative_item[index])

    @staticmethod
    def concat(parts: list[SampleSet]) -> SampleSet:
        return SampleSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("user", "candidate", "negative_item")))


@dataclass
class Batch:
    user_rows: torch.Tensor
    item_rows: torch.Tensor
    cat_rows: torch.Tensor
    behaviors: torch.Tensor
    timestamps: torch.Tensor
    labels: torch.Tensor

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return self.user_rows, self.item_rows, self.cat_rows, self.behaviors, self.timestamps


@dataclass
class FutureEvents:
    """Each user's held-out last events (`prepare(holdout_last=K)`), in time order; rows as in
    `PreparedData`, with ids unknown to the training events mapped to the OOV row."""

    start: np.ndarray  # (U + 1,) offsets
    item_rows: np.ndarray
    cat_rows: np.ndarray
    behaviors: np.ndarray
    timestamps: np.ndarray

    FIELDS = ("start", "item_rows", "cat_rows", "behaviors", "timestamps")

    def of(self, user_row: int) -> slice:
        return slice(int(self.start[user_row]), int(self.start[user_row + 1]))


@dataclass
class PreparedData:
    users: IdMap
    items: IdMap
    categories: IdMap
    user_start: np.ndarray  # (U + 1,) offsets of each user's events
    item_rows: np.ndarray
    cat_rows: np.ndarray
    behaviors: np.ndarray
    timestamps: np.ndarray
    item_category: np.ndarray  # category row of every item row (last seen)
    splits: dict[str, SampleSet] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    future: FutureEvents | None = None

    @property
    def num_events(self) -> int:
        return len(self.item_rows)

    def table_sizes(self) -> dict[str, int]:
        return {"num_users": len(self.users.ids), "num_items": self.items.rows, "num_categories": self.categories.rows}

    def user_events(self, user_row: int) -> slice:
        return slice(int(self.user_start[user_row]), int(self.user_start[user_row + 1]))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for arr in (self.users.ids, self.items.ids, self.categories.ids, self.user_start, self.item_rows,
                    self.cat_rows, self.behaviors, self.timestamps):
            h.update(np.ascontiguousarray(arr).tobytes())
        for name in sorted(self.splits):
            s = self.splits[name]
            h.update(name.encode())
            for arr in (s.user, s.candidate, s.negative_item):
                h.update(arr.tobytes())
        if self.future is not None:
            for name in FutureEvents.FIELDS:
                h.update(np.ascontiguousarray(getattr(self.future, name)).tobytes())
        return h.hexdigest()

    def user_of_event(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.users.ids), dtype=np.int64), np.diff(self.user_start))

    def training_event_mask(self) -> np.ndarray:
        """Events before each user's first validation or test candidate: what training may count
        (popularity of negatives, shard statistics for validation) without seeing an evaluated event."""
        first_eval = self.user_start[1:].copy()
        for name in ("validation", "test"):
            if name in self.splits and len(self.splits[name]):
                s = self.splits[name]
                np.minimum.at(first_eval, s.user, s.candidate)
        return np.arange(self.num_events) < first_eval[self.user_of_event()]

    def collate(self, samples: SampleSet, history: int) -> Batch:
        """Vectorised gather of (B, history + 1) windows, left-padded, candidate last."""
        offsets = np.arange(-history, 1, dtype=np.int64)
        idx = samples.candidate[:, None] + offsets
        valid = idx >= self.user_start[samples.user][:, None]
        idx = np.where(valid, idx, 0)
        items = np.where(valid, self.item_rows[idx], PADDING_ROW)
        cats = np.where(valid, self.cat_rows[idx], PADDING_ROW)
        behaviors = np.where(valid, self.behaviors[idx], 0).astype(np.int64)
        timestamps = np.where(valid, self.timestamps[idx], 0)
        negative = samples.negative_item >= 0
        items[:, -1] = np.where(negative, samples.negative_item, items[:, -1])
        cats[:, -1] = np.where(negative, self.item_category[np.maximum(samples.negative_item, 0)], cats[:, -1])
        return Batch(
            torch.from_numpy(samples.user),
            torch.from_numpy(items),
            torch.from_numpy(cats),
            torch.from_numpy(behaviors),
            torch.from_numpy(timestamps),
            torch.from_numpy(samples.label),
        )

    def save(self, path: Path) -> None:
        arrays = {
            "user_ids": self.users.ids, "item_ids": self.items.ids, "category_ids": self.categories.ids,
            "user_start": self.user_start, "item_rows": self.item_rows, "cat_rows": self.cat_rows,
            "behaviors": self.behaviors, "timestamps": self.timestamps, "item_category": self.item_category,
        }
        for name, s in self.splits.items():
            arrays.update({f"{name}.user": s.user, f"{name}.candidate": s.candidate, f"{name}.negative_item": s.negative_item})
        if self.future is not None:
            arrays.update({f"future.{name}": getattr(self.future, name) for name in FutureEvents.FIELDS})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")  # per process: concurrent writers never mix
        try:
            np.savez(tmp, info=np.frombuffer(json.dumps(self.info, sort_keys=True).encode(), dtype=np.uint8), **arrays)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> PreparedData:
        """Raises DatasetError (one line) for a missing, truncated or foreign file."""
        try:
            return cls._load(path)
        except Exception as exc:  # zipfile, zlib, numpy and key errors alike: one line, not a trace
            if isinstance(exc, OSError) and not os.path.isfile(path):
                raise DatasetError(f"{path}: no such dataset file") from None
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise DatasetError(f"{path}: not a readable tbsm-sdk dataset ({type(exc).__name__}: {first_line})") from None

    @classmethod
    def _load(cls, path: Path) -> PreparedData:
        with np.load(path) as z:  # allow_pickle stays False: a dataset file never runs code
            a = {k: z[k] for k in z.files}
        splits = {}
        for key in a:
            if key.endswith(".user"):
                name = key[: -len(".user")]
                splits[name] = SampleSet(a[f"{name}.user"], a[f"{name}.candidate"], a[f"{name}.negative_item"])
        return cls(
            users=IdMap(a["user_ids"], 0), items=IdMap(a["item_ids"], RESERVED_ROWS),
            categories=IdMap(a["category_ids"], RESERVED_ROWS), user_start=a["user_start"],
            item_rows=a["item_rows"], cat_rows=a["cat_rows"], behaviors=a["behaviors"],
            timestamps=a["timestamps"], item_category=a["item_category"], splits=splits,
            info=json.loads(a["info"].tobytes().decode()),
            future=FutureEvents(*(a[f"future.{n}"] for n in FutureEvents.FIELDS)) if "future.start" in a else None,
        )


def index_events(events: EventLog) -> PreparedData:
    """Dense id maps and user-contiguous event arrays (the log is sorted by user, then time)."""
    users = IdMap(np.unique(events.user), 0)
    items = IdMap(np.unique(events.item), RESERVED_ROWS)
    categories = IdMap(np.unique(events.category), RESERVED_ROWS)
    user_rows = users.lookup(events.user, unknown=-1)
    order = np.lexsort((events.timestamp, user_rows))
    if not np.array_equal(order, np.arange(len(order))):
        events = events.take(order)
        user_rows = user_rows[order]
    item_rows = items.lookup(events.item)
    cat_rows = categories.lookup(events.category)
    counts = np.bincount(user_rows, minlength=len(users.ids))
    user_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    item_category = np.full(items.rows, OOV_ROW, dtype=np.int64)
    item_category[PADDING_ROW] = PADDING_ROW
    # An item's category is the one of its latest event (in time, across users).
    by_time = np.argsort(events.timestamp, kind="stable")[::-1]
    latest_items, first = np.unique(item_rows[by_time], return_index=True)
    item_category[latest_items] = cat_rows[by_time][first]
    return PreparedData(
        users=users, items=items, categories=categories, user_start=user_start,
        item_rows=item_rows, cat_rows=cat_rows, behaviors=events.behavior.astype(np.int8),
        timestamps=events.timestamp.astype(np.int64), item_category=item_category,
    )


def extend_events(data: PreparedData, newer: EventLog, *, only_after_last: bool = True) -> tuple[PreparedData, dict[str, int]]:
    """`data` plus newer events, mapped through `data`'s id maps, for building bundles of the same
    checkpoint after more events arrived (the id maps, so every row, stay the checkpoint's).

    Returns the extended data and what happened to each newer event, counted (nothing is dropped
    silently): `added`; `unknown_user` (a user without a row in the checkpoint cannot get a
    bundle); `not_newer` with `only_after_last` (at or before that user's last known event: a log
    that repeats the run's own events adds only what is new); `unknown_item` / `unknown_category`
    (added, on the OOV row, as at training time). The result has no samples (`splits`): it is
    for shards and golden histories, not for training or evaluation. `info["extends"]` names
    the fingerprint of the data it extends, which `BundleBuilder` accepts in place of the
    checkpoint's own.
    """
    users = data.users.lookup(newer.user, unknown=-1)
    known = users >= 0
    counts = {"read": len(newer), "unknown_user": int((~known).sum())}
    if only_after_last:
        last = np.full(len(data.users.ids), np.iinfo(np.int64).min, dtype=np.int64)
        has_events = np.diff(data.user_start) > 0
        last[has_events] = data.timestamps[data.user_start[1:][has_events] - 1]
        newer_than_last = np.zeros(len(newer), bool)
        newer_than_last[known] = newer.timestamp[known] > last[users[known]]
        counts["not_newer"] = int((known & ~newer_than_last).sum())
        known &= newer_than_last
    added_users = users[known]
    items = data.items.lookup(newer.item[known])
    cats = data.categories.lookup(newer.category[known])
    counts.update(unknown_item=int((items == OOV_ROW).sum()), unknown_category=int((cats == OOV_ROW).sum()),
                  added=int(known.sum()))
    # Old events first within a user, then the newer ones in time order (a stable sort keeps the
    # run's own order of equal timestamps).
    user_of_event = np.concatenate([data.user_of_event(), added_users])
    timestamps = np.concatenate([data.timestamps, newer.timestamp[known].astype(np.int64)])
    is_new = np.concatenate([np.zeros(data.num_events, bool), np.ones(len(added_users), bool)])
    order = np.lexsort((timestamps, is_new, user_of_event)) if len(added_users) else np.arange(data.num_events)
    extended = PreparedData(
        users=data.users, items=data.items, categories=data.categories,
        user_start=np.concatenate([[0], np.cumsum(np.bincount(user_of_event, minlength=len(data.users.ids)))]).astype(np.int64),
        item_rows=np.concatenate([data.item_rows, items])[order],
        cat_rows=np.concatenate([data.cat_rows, cats])[order],
        behaviors=np.concatenate([data.behaviors, newer.behavior[known].astype(np.int8)])[order],
        timestamps=timestamps[order], item_category=data.item_category,
        info={**data.info, "extends": data.fingerprint(), "extended_with": counts, "events": data.num_events + counts["added"]},
    )
    return extended, counts


def _touched_keys(data: PreparedData) -> np.ndarray:
    return np.unique(data.user_of_event() * data.items.rows + data.item_rows)


@dataclass(frozen=True)
class NegativeSampler:
    """Where negative candidates come from; `log_q` is the log-probability of drawing each item row
    (what the trainer subtracts from a candidate's logit so the model still learns popularity)."""

    kind: str = "uniform"
    per_positive: int = 1

    def __post_init__(self) -> None:
        if self.kind not in NEGATIVE_SAMPLERS:
            raise ValueError(f"unknown negative sampler {self.kind!r}; expected one of {NEGATIVE_SAMPLERS}")
        if self.per_positive < 1:
            raise ValueError("negatives per positive must be at least 1")

    def probabilities(self, data: PreparedData) -> np.ndarray:
        """Draw probability of every item row (0 for the reserved rows)."""
        n_real = data.items.rows - RESERVED_ROWS
        p = np.zeros(data.items.rows)
        p[RESERVED_ROWS:] = 1.0 / max(n_real, 1)
        if self.kind == "popularity":
            counts = np.bincount(data.item_rows[data.training_event_mask()], minlength=data.items.rows).astype(np.float64)
            counts[:RESERVED_ROWS] = 0
            if counts.sum() > 0:
                p = POPULARITY_UNIFORM_MIX * p + (1 - POPULARITY_UNIFORM_MIX) * counts / counts.sum()
        return p

    def log_q(self, data: PreparedData) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(self.probabilities(data)).astype(np.float32)


def sample_negatives(data: PreparedData, users: np.ndarray, rng: np.random.Generator, touched: np.ndarray,
                     probabilities: np.ndarray | None = None) -> np.ndarray:
    """A random real item row per user that the user never touched (rejection sampling); uniform
    unless `probabilities` (one per item row) is given."""
    lo, hi = RESERVED_ROWS, data.items.rows
    if probabilities is None:
        draw = lambda k: rng.integers(lo, hi, size=k)  # noqa: E731
    else:
        cdf = np.cumsum(probabilities)
        draw = lambda k: np.minimum(np.searchsorted(cdf, rng.random(k) * cdf[-1], side="right"), hi - 1)  # noqa: E731
    out = draw(len(users))
    todo = np.arange(len(users))
    for _ in range(100):
        keys = users[todo] * data.items.rows + out[todo]
        pos = np.minimum(np.searchsorted(touched, keys), max(len(touched) - 1, 0))
        clash = touched[pos] == keys if len(touched) else np.zeros(len(todo), bool)
        todo = todo[clash]
        if not len(todo):
            return out
        out[todo] = draw(len(todo))
    raise ValueError("could not sample negative items: some users touched (almost) every item")


def _choose_positions(lengths: np.ndarray, first: np.ndarray, last: np.ndarray, k: int, rng: np.random.Generator):
    """Per user, up to k distinct positions in [first, last] (inclusive), uniformly at random.

    Returns (user_index, position) arrays. Vectorised: random keys, sorted within each user.
    """
    span = np.maximum(last - first + 1, 0)
    take = np.minimum(span, k)
    user_idx = np.repeat(np.arange(len(lengths)), span)
    offset_in_user = np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)
    keys = rng.random(len(user_idx))
    order = np.lexsort((keys, user_idx))
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - np.repeat(np.cumsum(span) - span, span)
    keep = rank < np.repeat(take, span)
    return user_idx[keep], (np.repeat(first, span) + offset_in_user)[keep]


def _pos_neg(data, user_idx, position, rng, touched, per_positive: int = 1, probabilities=None) -> SampleSet:
    cand = data.user_start[user_idx] + position
    pos = SampleSet(user_idx.astype(np.int64), cand.astype(np.int64), np.full(len(cand), -1, np.int64))
    users, cands = np.tile(pos.user, per_positive), np.tile(pos.candidate, per_positive)
    neg = SampleSet(users, cands, sample_negatives(data, users, rng, touched, probabilities))
    return SampleSet.concat([pos, neg])


def build_holdout(data: PreparedData, *, seed: int, samples_per_user: int, min_history: int = 1,
                  sampler: NegativeSampler = NegativeSampler()) -> None:
    """Time-ordered leave-last-out: per user, the last event is test, the one before validation,
    training candidates come from the events before those. Validation and test candidates get one
    uniform negative twin each (comparable across samplers); training candidates get
    `sampler.per_positive` negatives from `sampler`."""
    rng = np.random.default_rng(seed)
    touched = _touched_keys(data)
    n = np.diff(data.user_start)
    eligible = n >= min_history + 3
    users = np.flatnonzero(eligible)
    last = n[users] - 1
    data.splits["test"] = _pos_neg(data, users, last, rng, touched)
    data.splits["validation"] = _pos_neg(data, users, last - 1, rng, touched)
    u, p = _choose_positions(n[users], np.full(len(users), min_history), last - 2, samples_per_user, rng)
    data.splits["train"] = _pos_neg(data, users[u], p, rng, touched, sampler.per_positive, _train_probabilities(data, sampler))
    data.info.update(protocol="holdout", seed=seed, samples_per_user=samples_per_user, min_history=min_history,
                     users_skipped_too_short=int((~eligible).sum()))


def _train_probabilities(data: PreparedData, sampler: NegativeSampler) -> np.ndarray | None:
    # Validation and test are already in data.splits, so the counts exclude their events.
    return None if sampler.kind == "uniform" else sampler.probabilities(data)


# Positives (and as many negatives) per training user, by how many of the user's last
# `_REFERENCE_WINDOW` events there are: <=10 -> 0, <=20 -> 1, <=30 -> 3, <=40 -> 6, otherwise the cap.
_REFERENCE_REGIME = (0, 1, 3, 6)
_REFERENCE_WINDOW = 200


def _reference_windows(n: np.ndarray, per_user: int, history: int, rng: np.random.Generator, *, end: np.ndarray,
                       repeat: int = 1):
    """The reference's window draw: candidates among each user's last 200 events, with replacement,
    `repeat` times the reference's count (several negatives per positive).

    Candidates stay before `end` (exclusive; the user's validation event); negatives keep the
    20-event history and replace the candidate.
    """
    recent = np.minimum(n, _REFERENCE_WINDOW)
    regime = (recent - 1) // 10
    count = np.where(regime < len(_REFERENCE_REGIME), np.take(_REFERENCE_REGIME, np.minimum(regime, 3)), per_user)
    count = np.minimum(count, per_user) * repeat
    lo = n - recent + np.minimum(history, recent - 2)
    hi = end
    count = np.where(hi > lo, count, 0)
    user_idx = np.repeat(np.arange(len(n)), count)
    position = lo[user_idx] + (rng.random(len(user_idx)) * (hi - lo)[user_idx]).astype(np.int64)
    return user_idx, position


def build_reference(data: PreparedData, *, seed: int, samples_per_user: int = 10, history: int = 20,
                    sampler: NegativeSampler = NegativeSampler()) -> None:
    """The reference's protocol (tools/taobao_prepare.py + tbsm_data_pytorch.py).

    Users whose last event is after the 70th percentile of last-event times are test users: one
    point each, their last event kept or (p = 1/2) swapped for a random other item. The other
    users train on windows drawn from their last 200 events (see `_reference_windows`), all of them
    before the user's final event; that final event (with a uniform negative twin) is the
    validation set. So training uses exactly the reference's users, and validation is later in
    time than every training window of its user and shares no sample with training (the
    reference validated on training windows).
    """
    rng = np.random.default_rng(seed)
    touched = _touched_keys(data)
    n = np.diff(data.user_start)
    last_time = data.timestamps[data.user_start[1:] - 1]
    split_time = np.sort(last_time)[int(len(last_time) * 0.7)]
    test_users = np.flatnonzero(last_time > split_time)
    train_users = np.flatnonzero(last_time <= split_time)
    cand = data.user_start[test_users] + n[test_users] - 1
    true_item = data.item_rows[cand]
    swap = rng.random(len(test_users)) < 0.5
    random_item = rng.integers(RESERVED_ROWS, data.items.rows - 1, size=len(test_users))
    random_item += random_item >= true_item  # uniform over the other items
    data.splits["test"] = SampleSet(test_users.astype(np.int64), cand.astype(np.int64), np.where(swap, random_item, -1))
    # Validation: the final event of every training user who gives training windows (>= 10 events).
    val_users = train_users[n[train_users] > 10]
    data.splits["validation"] = _pos_neg(data, val_users, n[val_users] - 1, rng, touched)
    probabilities = _train_probabilities(data, sampler)
    parts = []
    for positive in (True, False):
        u, p = _reference_windows(n[train_users], samples_per_user, history, rng, end=n[train_users] - 1,
                                  repeat=1 if positive else sampler.per_positive)
        users = train_users[u].astype(np.int64)
        negatives = np.full(len(u), -1, np.int64) if positive else sample_negatives(data, users, rng, touched, probabilities)
        parts.append(SampleSet(users, (data.user_start[users] + p).astype(np.int64), negatives))
    data.splits["train"] = SampleSet.concat(parts)
    data.info.update(protocol="reference", seed=seed, samples_per_user=samples_per_user, split_time=int(split_time),
                     test_users=len(test_users), train_users=len(train_users), validation_users=len(val_users))


def split_future(events: EventLog, holdout_last: int) -> tuple[EventLog, EventLog]:
    """(kept, held out): each user's last `holdout_last` events (by time) are held out, when the
    user has more than `holdout_last` events; shorter users keep all of theirs."""
    order = np.lexsort((events.timestamp, events.user))
    events = events.take(order)
    starts = np.flatnonzero(np.r_[True, events.user[1:] != events.user[:-1]])
    counts = np.diff(np.r_[starts, len(events)])
    position = np.arange(len(events)) - np.repeat(starts, counts)
    n = np.repeat(counts, counts)
    held = (n > holdout_last) & (position >= n - holdout_last)
    return events.take(~held), events.take(held)


def prepare(events: EventLog, *, protocol: str = "holdout", seed: int = 0, samples_per_user: int | None = None,
            history: int = 20, holdout_last: int = 0, sampler: NegativeSampler = NegativeSampler()) -> PreparedData:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    if len(events) == 0:
        raise ValueError("the event log is empty: nothing to train on")
    if holdout_last < 0:
        raise ValueError("holdout_last must be >= 0")
    future = None
    if holdout_last:
        events, future = split_future(events, holdout_last)
    data = index_events(events)
    if future is not None:
        future_user = data.users.lookup(future.user, unknown=-1)  # every held-out user kept earlier events
        data.future = FutureEvents(
            start=np.concatenate([[0], np.cumsum(np.bincount(future_user, minlength=len(data.users.ids)))]).astype(np.int64),
            item_rows=data.items.lookup(future.item), cat_rows=data.categories.lookup(future.category),
            behaviors=future.behavior.astype(np.int8), timestamps=future.timestamp.astype(np.int64),
        )
    if protocol == "holdout":
        build_holdout(data, seed=seed, samples_per_user=samples_per_user or 20, sampler=sampler)
    else:
        build_reference(data, seed=seed, samples_per_user=samples_per_user or 10, history=history, sampler=sampler)
    data.info.update(history=history, events=data.num_events, users=len(data.users.ids),
                     items=len(data.items.ids), categories=len(data.categories.ids),
                     split_sizes={k: len(v) for k, v in data.splits.items()},
                     holdout_last=holdout_last, held_out_events=0 if future is None else len(future),
                     negatives={"sampler": sampler.kind, "per_positive": sampler.per_positive})
    return data
