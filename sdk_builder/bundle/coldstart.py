"""The cold-start bundle (`tbsm-sdk build --new-user`): for a new install, which has no user row.

Same program, same templates, same files as a personal bundle; what differs:
- the user state is a population state: `[population user vector, its share of the candidate top
  layer's bias]`, the shape of a personal bundle's per-user `user` constant (`population_state`);
- the shard is the most popular items plus, for breadth, the most popular items of every category
  taken in turn (`cold_start_ranked`); no user's own or co-visited items;
- golden histories are synthetic (empty, a few popular items, all unknown ids), with user_id null;
- `manifest.kind` is "cold_start" and `manifest.user_id` null.

Which population vector: docs/quality.md ("Cold start") has the measurement behind the default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.tbsm import RESERVED_ROWS, TBSM
from sdk_builder.bundle.build import BuildResult, BundleBuilder
from sdk_builder.bundle.golden import GOLDEN_CANDIDATES, EagerReference, ShardView, score_golden
from sdk_builder.bundle.select import select_categories, shard_of
from sdk_builder.bundle.store import cold_start_path
from sdk_builder.data.dataset import PreparedData
from sdk_builder.data.events import EventLog
from sdk_builder.formats import MAX_HISTORY, PROGRAM, Behavior, BundleError, Event, EventHistory, GoldenCase
from sdk_builder.program import Shard, user_state
from sdk_builder.runs import LoadedCheckpoint, unknown_user_row
from sdk_builder.shard import ShardIndex
from sdk_builder.util import sha256_bytes

# mean: the mean of the trained user rows; zero: the row an untrained user starts from; unknown:
# the row trained for unknown users (runs trained with TrainConfig.user_dropout > 0 only).
POPULATIONS = ("mean", "zero", "unknown")
DEFAULT_POPULATION = "mean"
# Shares of the cold-start shard: global popularity, then breadth over categories.
COLD_START_WEIGHTS = {"popular": 0.7, "category": 0.3}
COLD_START_POLICY_NAME = "cold_start:popular+category"


def population_vector(model: TBSM, population: str = DEFAULT_POPULATION, unknown_row: int | None = None) -> torch.Tensor:
    """The user vector (emb_dim) a cold-start bundle ranks with; `unknown_row`: the row trained for
    unknown users, if the run has one (`sdk_builder.runs.unknown_user_row`)."""
    table = model.tower.user_emb.weight.detach()
    users = table[:unknown_row] if unknown_row is not None else table
    if population == "mean":
        return users.mean(dim=0)
    if population == "zero":
        return torch.zeros(table.shape[1])
    if population == "unknown":
        if unknown_row is None:
            raise BundleError("population 'unknown': the run has no unknown-user row (train it with user_dropout > 0)")
        return table[unknown_row].clone()
    raise ValueError(f"unknown population {population!r}; expected one of {POPULATIONS}")


def with_user_row(model: TBSM, vector: torch.Tensor) -> tuple[TBSM, int]:
    """(the model with `vector` appended to its user table, that row). Shares every other weight:
    the slicing, the eager reference and the golden scoring then treat the population like a user."""
    tower = copy.copy(model.tower)
    tower._modules = dict(model.tower._modules)
    table = model.tower.user_emb.weight.detach()
    grown = nn.Embedding(table.shape[0] + 1, table.shape[1])
    with torch.no_grad():
        grown.weight.copy_(torch.cat([table, vector.reshape(1, -1).to(table.dtype)]))
    tower._modules["user_emb"] = grown
    extended = copy.copy(model)
    extended._modules = dict(model._modules)
    extended._modules["tower"] = tower
    return extended, int(table.shape[0])


def population_state(model: TBSM, population: str = DEFAULT_POPULATION, unknown_row: int | None = None) -> np.ndarray:
    """[population user vector (D), its share of the candidate top layer's bias (Z)], float32: exactly
    what a personal bundle carries for its user (`manifest.user_state`), for the population."""
    extended, row = with_user_row(model, population_vector(model, population, unknown_row))
    return user_state(extended, row).numpy().copy()


def cold_start_ranked(index: ShardIndex, size: int, weights: dict[str, float] = COLD_START_WEIGHTS
                      ) -> tuple[np.ndarray, dict[str, int]]:
    """The cold-start shard in its own order: the most popular items, then round after round one
    item per category (categories by popularity, each category's items by popularity)."""
    popular = index.popular[: int(round(size * weights["popular"]))]
    data = index.data
    category_counts = np.bincount(data.item_category[index.popular], weights=index.popularity[index.popular],
                                  minlength=data.categories.rows)
    category_order = np.empty(data.categories.rows, np.int64)
    category_order[np.lexsort((np.arange(data.categories.rows), -category_counts))] = np.arange(data.categories.rows)
    cats = data.item_category[index.cat_items]
    rank_in_category = np.arange(len(index.cat_items)) - index.cat_offsets[cats]
    diverse = index.cat_items[np.lexsort((category_order[cats], rank_in_category))]
    diverse = diverse[~np.isin(diverse, popular)][: max(size - len(popular), 0)]
    return np.concatenate([popular, diverse]), {"popular": int(len(popular)), "category": int(len(diverse))}


def cold_start_shard(builder: BundleBuilder, user_row: int) -> tuple[Shard, dict[str, int]]:
    ranked, sources = cold_start_ranked(builder.index, builder.policy.shard_size)
    data = builder.data
    category_rows, over = select_categories(np.zeros(0, np.int64), data.item_category[ranked],
                                            builder.layout.category_rows - RESERVED_ROWS)
    sources["categories_over_capacity"] = over
    return shard_of(builder.index, builder.layout, user_row, ranked, category_rows, builder.prior_scale), sources


def cold_start_requests(ckpt: LoadedCheckpoint, data: PreparedData, seed: int, shard: Shard,
                        ranked: np.ndarray) -> list[GoldenCase]:
    """Synthetic golden histories (there is no user): the most popular shard items viewed one
    minute apart (all of max_history, the last 3 and the last one), none, and unknown ids only; user_id null."""
    popular = ranked[:MAX_HISTORY][::-1]  # oldest first: the most popular item is the latest event
    start = int(data.timestamps.max()) if data.num_events else 0
    events = [Event.model_construct(item_id=int(i), category_id=int(c), behavior=Behavior.pv, timestamp=start + 60 * k)
              for k, (i, c) in enumerate(zip(ckpt.items.global_id(popular).tolist(),
                                             ckpt.categories.global_id(data.item_category[popular]).tolist()))]
    rng = np.random.default_rng([seed, len(shard.item_rows)])
    shard_ids = ckpt.items.global_id(shard.item_rows)
    picks = np.sort(rng.choice(len(shard_ids), min(GOLDEN_CANDIDATES, len(shard_ids)), replace=False))
    unknown_id = int(ckpt.items.ids.max()) + 1 + int(rng.integers(0, 1000))
    candidates = shard_ids[picks].tolist() + [unknown_id]
    foreign = [e.model_copy(update={"item_id": unknown_id + 1 + k}) for k, e in enumerate(events[-5:])]
    request_time = (events[-1].timestamp if events else start) + 3600
    histories = {"popular_history": events, "short_history": events[-3:], "empty_history": [], "all_oov_history": foreign,
                 "one_event_history": events[-1:]}
    return [GoldenCase.model_construct(name=name, history=EventHistory.model_construct(user_id=None, events=hist),
                                       request_time=request_time, candidates=candidates, scores=[])
            for name, hist in histories.items()]


def cold_start_builder(builder: BundleBuilder, population: str = DEFAULT_POPULATION) -> tuple[BundleBuilder, int]:
    """(a view of `builder` whose model has the population row appended, that row): stamps the
    same template, replays against the same eager model plus that row; its own build key."""
    if builder.stamping and builder.template is None:
        builder.prepare_stamping()  # on the personal builder: its users guard it, and it is reused
    unknown_row = unknown_user_row(builder.ckpt.config, builder.ckpt.payload.get("train_config", {}))
    vector = population_vector(builder.model, population, unknown_row)
    extended, row = with_user_row(builder.model, vector)
    cold = copy.copy(builder)
    cold.model = extended
    # The checkpoint as the build sees it: its model has the population row too, so every
    # ShardView (manifest.user_state) and eager reference of the cold-start shard reads that row.
    cold.ckpt = copy.copy(builder.ckpt)
    cold.ckpt.model = with_user_row(builder.ckpt.model, vector)[0]
    cold.reference = EagerReference(extended, cold.ckpt)
    # No refresh.pte yet: its golden cases are cut from the user's own last events (none here).
    cold.refresh = None
    cold.policy = dataclasses.replace(builder.policy, name=COLD_START_POLICY_NAME, weights=dict(COLD_START_WEIGHTS))
    cold.build_key = sha256_bytes(json.dumps({"personal": builder.build_key, "kind": "cold_start", "population": population,
                                              "weights": COLD_START_WEIGHTS}, sort_keys=True).encode())
    return cold, row


def build_cold_start(builder: BundleBuilder, out_root: Path, *, population: str = DEFAULT_POPULATION,
                     skip_current: bool = False) -> BuildResult:
    """The cold-start bundle in OUT/cold_start/ (written atomically, replayed like any bundle)."""
    cold, row = cold_start_builder(builder, population)
    path = cold_start_path(out_root)
    if skip_current and cold.is_current(path):
        return BuildResult(None, path, (path / PROGRAM).stat().st_size, sum(f.stat().st_size for f in path.iterdir()),
                           0.0, 0.0, skipped=True)
    shard, sources = cold_start_shard(cold, row)
    ranked, _ = cold_start_ranked(cold.index, cold.policy.shard_size)
    cases = cold_start_requests(cold.ckpt, cold.data, cold.seed, shard, ranked)
    view = ShardView(cold.ckpt, shard)
    [requests] = score_golden(cold.reference, [(view, shard, cases)])
    return cold._build_one(None, shard, sources, view, cases, requests, out_root)


def hold_out_users(events: EventLog, fraction: float, *, seed: int = 0) -> tuple[EventLog, EventLog]:
    """(kept, held out): every event of a seeded `fraction` of the users is held out, so those users
    reach neither training, the id maps, popularity nor any shard: new users, for measuring cold start."""
    users = np.unique(events.user)
    held_users = np.random.default_rng(seed).choice(users, int(round(fraction * len(users))), replace=False)
    held = np.isin(events.user, held_users)
    return events.take(~held), events.take(held)
