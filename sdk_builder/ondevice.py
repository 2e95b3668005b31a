"""Real bundles for the on-device evaluation: build each test user's stamped bundle (as CI does),
open it as the phone does and rank its whole shard in the ExecuTorch runtime, in one process.

Bundles are built in chunks into a temporary directory and deleted once ranked, so thousands of
users need neither thousands of processes nor gigabytes of disk (the refresh evaluation keeps the
frozen bundles until their rebuilds from them are ranked).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from sdk_builder.bundle import BundleBuilder
from sdk_builder.bundle.delta import PreviousBundles
from sdk_builder.client import Bundle
from sdk_builder.data.dataset import PreparedData, extend_events
from sdk_builder.evaluation import StreamReport, StreamSplit, StreamUser, UserRequest, policy_orders, stream_quality
from sdk_builder.formats import BEHAVIOR_NAMES, MAX_HISTORY, Event, EventHistory
from sdk_builder.refresh import RefreshConfig
from sdk_builder.shard import DEFAULT_SLACK, ShardPolicy
from sdk_builder.runs import LoadedCheckpoint

CHUNK = 64


class BundleRanker:
    """`__call__(recipe, requests, shards)` -> each request's scores of its shard items (item rows,
    sorted), from the user's real bundle in the ExecuTorch runtime. Counts int8 fallbacks."""

    def __init__(self, ckpt: LoadedCheckpoint, data: PreparedData, policy: ShardPolicy | None = None, *, seed: int = 0,
                 progress: Callable[[int], None] = lambda n: None) -> None:
        self.ckpt, self.data, self.policy, self.seed = ckpt, data, policy or ShardPolicy(), seed
        self.builders: dict[str, BundleBuilder] = {}
        self.fallbacks: dict[str, int] = {}
        self.bundle_bytes: dict[str, list[int]] = {}
        self.progress = progress

    def builder(self, recipe: str) -> BundleBuilder:
        if recipe not in self.builders:
            # An int8 bundle over its accuracy budget is shipped as fp32 in production (`fp32`), so
            # that is what the phone would rank with; the count is reported.
            # The evaluation measures whatever the run is, so the build-time quality gate is off.
            builder = BundleBuilder(self.ckpt, self.data, self.policy, recipe=recipe, seed=self.seed,
                                    on_budget_exceeded="fp32", allow_weak_model=True)
            builder.prepare_stamping()
            self.builders[recipe] = builder
        return self.builders[recipe]

    def history(self, request: UserRequest) -> EventHistory:
        data, ckpt = self.data, self.ckpt
        lo = max(int(data.user_start[request.user_row]), request.history_end - MAX_HISTORY)
        sl = slice(lo, request.history_end)
        events = [Event(item_id=int(i), category_id=int(c), behavior=BEHAVIOR_NAMES[int(b)], timestamp=int(t))
                  for i, c, b, t in zip(ckpt.items.global_id(data.item_rows[sl]), ckpt.categories.global_id(data.cat_rows[sl]),
                                        data.behaviors[sl], data.timestamps[sl])]
        return EventHistory(user_id=int(ckpt.users.ids[request.user_row]), events=events)

    def __call__(self, recipe: str, requests: list[UserRequest], shards: list[np.ndarray]) -> list[np.ndarray]:
        builder = self.builder(recipe)
        self.fallbacks[recipe] = 0
        self.bundle_bytes[recipe] = []
        scores: list[np.ndarray] = []
        with tempfile.TemporaryDirectory(prefix="tbsm-ondevice-") as tmp:
            for lo in range(0, len(requests), CHUNK):
                chunk = requests[lo : lo + CHUNK]
                user_ids = [int(self.ckpt.users.ids[r.user_row]) for r in chunk]
                results = builder.build_many(user_ids, Path(tmp))
                for request, shard, result in zip(chunk, shards[lo : lo + CHUNK], results):
                    bundle = Bundle(result.path)
                    ids = bundle.manifest.items.ids
                    if ids != self.ckpt.items.global_id(shard).tolist():
                        raise RuntimeError(f"user {result.user_id}: the bundle's shard differs from the evaluated shard")
                    scores.append(bundle.score(self.history(request), request.request_time, ids))
                    self.fallbacks[recipe] += int(result.recipe != recipe)
                    self.bundle_bytes[recipe].append(result.bytes_total)
                    shutil.rmtree(result.path)
                self.progress(len(chunk))
        return scores


def phone_events(split: StreamSplit, user: StreamUser, streamed: int, keep: int = MAX_HISTORY) -> list[Event]:
    """What the phone has recorded once `streamed` of the user's stream events arrived: the last
    `keep` events the bundle was built from, then the streamed ones, oldest first."""
    data, log = split.data, split.stream
    sl = data.user_events(user.user_row)
    sl = slice(max(sl.start, sl.stop - keep), sl.stop)
    kept = zip(data.items.global_id(data.item_rows[sl]).tolist(), data.categories.global_id(data.cat_rows[sl]).tolist(),
               data.behaviors[sl].tolist(), data.timestamps[sl].tolist())
    st = slice(user.stream.start, user.stream.start + streamed)
    new = zip(log.item[st].tolist(), log.category[st].tolist(), log.behavior[st].tolist(), log.timestamp[st].tolist())
    return [Event(item_id=i, category_id=c, behavior=BEHAVIOR_NAMES[b], timestamp=t) for i, c, b, t in (*kept, *new)]


def state_after_stream(bundle: Bundle, split: StreamSplit, user: StreamUser) -> np.ndarray | None:
    """The user state the phone holds once the whole stream arrived: the client's refresh loop each
    time its history grew by `every_events` events, on the events it has (`phone_events`). None
    for a bundle without a refresh program, or a stream too short to trigger one (the shipped state)."""
    record = bundle.manifest.refresh
    if record is None:
        return None
    state = None
    for arrived in range(record.every_events, user.stream.stop - user.stream.start + 1, record.every_events):
        state = bundle.refresh(state, phone_events(split, user, arrived, keep=record.events))
    return state


def rank_after_stream(builder: BundleBuilder, split: StreamSplit, users: list[StreamUser], *, keep_in: Path | None = None,
                      progress: Callable[[int], None] = lambda n: None) -> tuple[list[np.ndarray], dict[str, list[np.ndarray]]]:
    """Each user's real bundle from `builder` (its data decides what the bundle knows), opened as the
    phone opens it, ranking its whole shard in the ExecuTorch runtime after the whole stream arrived
    (history: the last MAX_HISTORY events on the phone, i.e. the streamed ones).
    Returns each user's shard (item rows, sorted) and its scores with the shipped state
    ("shipped") and, for bundles with a refresh program, the state refreshed on the way ("refreshed").
    The bundles are deleted once ranked, unless `keep_in` (a build --out) is given."""
    ckpt = builder.ckpt
    shards: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {"shipped": []}
    with tempfile.TemporaryDirectory(prefix="tbsm-stream-") as tmp:
        for lo in range(0, len(users), CHUNK):
            chunk = users[lo : lo + CHUNK]
            user_ids = [int(ckpt.users.ids[u.user_row]) for u in chunk]
            for user, user_id, result in zip(chunk, user_ids, builder.build_many(user_ids, keep_in or Path(tmp))):
                bundle = Bundle(result.path)
                ids = bundle.manifest.items.ids
                events = phone_events(split, user, user.stream.stop - user.stream.start)
                history = EventHistory(user_id=user_id, events=events[-MAX_HISTORY:])
                shards.append(ckpt.items.lookup(np.array(ids)))
                scores["shipped"].append(bundle.score(history, user.request_time, ids))
                if bundle.manifest.refresh is not None:
                    state = state_after_stream(bundle, split, user)
                    scores.setdefault("refreshed", []).append(bundle.score(history, user.request_time, ids, state=state))
                if keep_in is None:
                    shutil.rmtree(result.path)
            progress(len(chunk))
    return shards, scores


def evaluate_stream(ckpt: LoadedCheckpoint, split: StreamSplit, *, policy: ShardPolicy | None = None,
                    max_users: int | None = None, seed: int = 0, recipe: str = "xnnpack",
                    refresh: RefreshConfig | None = RefreshConfig(), delta_slack: float | None = DEFAULT_SLACK,
                    progress: Callable[[int], None] = lambda n: None) -> StreamReport:
    """Issue 13's refresh measurement (`stream_split`, `stream_quality`) with real bundles: (a) each
    user's bundle built from the kept events, (b) that bundle with the user state refreshed on the
    phone by its refresh program (`refresh`; None leaves (b) out) as the stream arrives, (c) rebuilt
    from kept + streamed events (every user's: the server's popularity and co-visits see them too)
    with the same checkpoint, and (c') rebuilt so from (a) as `build --delta-from` does (shard and
    co-visit list hysteresis at `delta_slack`; None leaves it out); all rank after the whole stream
    arrived, from the same on-device history."""
    users = split.users
    if max_users is not None and len(users) > max_users:
        users = [users[i] for i in np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))]
    # The stream follows each user's kept events by position (ratings may share a timestamp).
    rebuilt, counts = extend_events(split.data, split.stream, only_after_last=False)
    shards, scores = {}, {}
    template = None
    builds = [("frozen", split.data, refresh, None), ("rebuilt", rebuilt, None, None)]
    if delta_slack is not None:
        builds.append(("patched", rebuilt, None, delta_slack))
    with tempfile.TemporaryDirectory(prefix="tbsm-frozen-") as frozen_out:
        for name, data, refresh_config, slack in builds:
            # The evaluation measures whatever the run is, so the build-time quality gate is off.
            previous = PreviousBundles(root=Path(frozen_out)) if slack is not None else None
            builder = BundleBuilder(ckpt, data, policy, recipe=recipe, seed=seed, on_budget_exceeded="fp32",
                                    allow_weak_model=True, refresh=refresh_config, previous=previous,
                                    shard_slack=slack if slack is not None else DEFAULT_SLACK)
            if template is None:
                builder.prepare_stamping()
                template = builder.template
            builder.template = template  # same checkpoint, recipe and layout: one export serves all
            keep_in = Path(frozen_out) if name == "frozen" and delta_slack is not None else None
            shards[name], ranked = rank_after_stream(builder, split, users, keep_in=keep_in, progress=progress)
            if name == "frozen":
                scores.update(policy_orders(split, users, shards[name], builder.policy))
            scores[name] = ranked["shipped"]
            if "refreshed" in ranked:
                scores["refreshed"] = ranked["refreshed"]
    report = stream_quality(split, users, shards, scores, seed=seed)
    report.stream_events = counts
    return report
