"""Golden vectors: real histories of a user scored by the eager full model, replayed at build and
verify time (and by the apps) against the compiled program.

`EagerReference` scores requests the way the phone sees them (ids outside the user's shard map to
the OOV row) with the full eager model; it is the reference both for golden vectors and for the
int8 accuracy budget.
"""

from __future__ import annotations

import numpy as np
import torch

from model.tbsm import OOV_ROW, PADDING_ROW, RESERVED_ROWS, TBSM
from sdk_builder.client import EncodedRequest, encode, golden_max_diff, padded_events, refresh_state, run_method
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import (
    BEHAVIOR_CODES, BEHAVIOR_NAMES, Behavior, MAX_HISTORY, Event, EventHistory, GoldenCase, GoldenSet, IdShard, Manifest,
    RefreshCase,
)
from sdk_builder.program import (
    Shard, built_after_of, prior_of, prior_tables, program_spec, shard_prior, user_state,
)
from sdk_builder.runs import LoadedCheckpoint
from sdk_builder.util import sorted_lookup

GOLDEN_TOLERANCE = 1e-5
GOLDEN_CANDIDATES = 16
NEW_EVENTS = 3  # events after the build in the golden case that re-ranks the prior
GOLDEN_CASES = 5  # per user: full, short, empty, all-OOV and after-the-build histories
REFRESH_TOLERANCE = 1e-5  # per state element, after a whole refresh loop
REFRESH_SHORT = 5  # events of the short refresh case (the rest of the program's window is padding)
_PROGRAM_SPEC = program_spec()  # read-only: shared by every view

Request = tuple[EventHistory, int, list[int]]  # history, request time, global candidate ids
_BEHAVIOR_OF_CODE = {code: Behavior(name) for code, name in BEHAVIOR_NAMES.items()}


class ShardView:
    """The parts of a manifest `encode` needs, before the manifest itself exists. Built once per
    user: the id lists come from our own id maps (sorted, non-negative), so they skip validation.
    `user_state`: the shipped state, by default the shard's user row of the checkpoint's model."""

    def __init__(self, ckpt: LoadedCheckpoint, shard: Shard, state: np.ndarray | None = None) -> None:
        item_ids, category_ids = ckpt.items.global_id(shard.item_rows), ckpt.categories.global_id(shard.category_rows)
        self.items = IdShard.model_construct(ids=item_ids.tolist())
        self.categories = IdShard.model_construct(ids=category_ids.tolist())
        self.behaviors = dict(BEHAVIOR_CODES)
        self.program = _PROGRAM_SPEC
        self.user_state = (user_state(ckpt.model, shard.user_row).numpy() if state is None
                           else np.asarray(state, dtype=np.float32))
        self.encoding = _EncodingView(self, item_ids, category_ids)


class _EncodingView:
    """A ShardView whose id lists are arrays, for `encode`: looking ids up in the manifest's lists
    converts each list to an array on every request, which was most of a golden request's cost."""

    def __init__(self, view: ShardView, item_ids: np.ndarray, category_ids: np.ndarray) -> None:
        self.items = IdShard.model_construct(ids=np.asarray(item_ids, np.int64))
        self.categories = IdShard.model_construct(ids=np.asarray(category_ids, np.int64))
        self.behaviors, self.program, self.user_state = view.behaviors, view.program, view.user_state


def last_events(ckpt: LoadedCheckpoint, data: PreparedData, user_row: int, n: int) -> list[Event]:
    """The user's last `n` events of the data, oldest first. Events of our own prepared data
    (non-negative ids, known behaviours): built without re-validating what the ingestion already
    checked (~40 us a case otherwise)."""
    sl = data.user_events(user_row)
    return [
        Event.model_construct(item_id=i, category_id=c, behavior=_BEHAVIOR_OF_CODE[b], timestamp=t)
        for i, c, b, t in zip(ckpt.items.global_id(data.item_rows[sl][-n:]).tolist(),
                              ckpt.categories.global_id(data.cat_rows[sl][-n:]).tolist(),
                              data.behaviors[sl][-n:].tolist(), data.timestamps[sl][-n:].tolist())
    ]


def refresh_cases(view: ShardView, events: list[Event], record, gradient) -> list[RefreshCase]:
    """The refresh golden cases of a user: the refresh loop from the shipped state on its last
    `record.events` events and on its last REFRESH_SHORT, with `gradient(state, event inputs)` the
    refresh program's: every client's loop must reproduce them (verify, the C++ client)."""
    cases = []
    for name, chosen in (("recent_events", events[-record.events:]), ("few_events", events[-REFRESH_SHORT:])):
        inputs = [torch.from_numpy(a) for a in padded_events(view, chosen, record.events)]
        after = refresh_state(view.user_state, view.user_state, record, lambda s: gradient(s, inputs))
        cases.append(RefreshCase(name=name, events=chosen, state_before=view.user_state.tolist(),
                                 state_after=after.tolist(), tolerance=REFRESH_TOLERANCE))
    return cases


def golden_requests(ckpt: LoadedCheckpoint, data: PreparedData, seed: int, user_id: int, shard: Shard) -> list[GoldenCase]:
    """Real histories of the user (full, short, empty, all-OOV, and one ending in events after the
    build, which re-rank the prior on the phone) with shard and unknown candidates (no scores yet)."""
    events = last_events(ckpt, data, shard.user_row, MAX_HISTORY)
    last_time = events[-1].timestamp if events else 0
    rng = np.random.default_rng([seed, user_id])
    shard_ids = ckpt.items.global_id(shard.item_rows)
    picks = np.sort(rng.choice(len(shard_ids), min(GOLDEN_CANDIDATES, len(shard_ids)), replace=False))
    unknown_id = int(ckpt.items.ids.max()) + 1 + int(rng.integers(0, 1000))
    candidates = shard_ids[picks].tolist() + [unknown_id]
    foreign = [e.model_copy(update={"item_id": unknown_id + 1 + k}) for k, e in enumerate(events[-5:])]
    seen = {e.item_id for e in events}
    fresh_ids = [int(i) for i in shard_ids[::-1] if int(i) not in seen][:NEW_EVENTS]
    fresh_rows = ckpt.items.lookup(np.asarray(fresh_ids, dtype=np.int64))
    fresh = [Event.model_construct(item_id=i, category_id=int(c), behavior=Behavior.pv, timestamp=last_time + 60 * (k + 1))
             for k, (i, c) in enumerate(zip(fresh_ids, ckpt.categories.global_id(ckpt.item_category[fresh_rows]).tolist()))]
    histories = {"full_history": events, "short_history": events[-3:], "empty_history": [], "all_oov_history": foreign,
                 "new_events_history": (events + fresh)[-MAX_HISTORY:]}
    return [GoldenCase.model_construct(name=name, history=EventHistory.model_construct(user_id=user_id, events=hist),
                                       request_time=last_time + 3600, candidates=candidates, scores=[])
            for name, hist in histories.items()]


class StaticPrior:
    """A shard's prior for histories without events after the build (most golden cases): every
    event is then at or before `built_after`, no item is a seed or co-visited, and `live_positions`
    returns the build-time positions whatever the history. Computed once per shard from the same
    tensors by the same ops as `shard_prior`, so the bytes are the same (tests/test_build_speed.py
    compares them); histories with fresh events go through `shard_prior` (`prior`)."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        self.slots = tables["item_slot"].to(torch.int64).numpy()
        self.built_after = int(built_after_of(tables["prior_params"]))
        self._tables = tables
        self._prior: np.ndarray | None = None

    def prior(self, hist_items: np.ndarray, hist_timestamps: np.ndarray) -> np.ndarray:
        """The prior of every local item row after this history, as the program computes it."""
        static = self.prior_for(hist_items, hist_timestamps)
        if static is not None:
            return static
        return shard_prior(self._tables, torch.from_numpy(np.asarray(hist_items, dtype=np.int64)),
                           torch.from_numpy(np.asarray(hist_timestamps, dtype=np.int64))).numpy()

    def prior_for(self, hist_items: np.ndarray, hist_timestamps: np.ndarray) -> np.ndarray | None:
        """The prior of every local item row after this history, or None when it has fresh events."""
        fresh = (self.slots[np.asarray(hist_items, np.int64)] >= RESERVED_ROWS) & (np.asarray(hist_timestamps) > self.built_after)
        if fresh.any():
            return None
        if self._prior is None:
            tables = self._tables
            positions = tables["candidate_position"].to(torch.int64)
            self._prior = prior_of(positions, tables["prior_params"])[tables["item_slot"].to(torch.int64)].numpy()
        return self._prior


class EagerReference:
    """The full eager model on requests as the phone encodes them: the sigmoid of its logit plus
    the shard's prior of the candidate, exactly what a program returns."""

    def __init__(self, model: TBSM, ckpt: LoadedCheckpoint) -> None:
        self.model, self.ckpt = model, ckpt

    def scores_mixed(self, requests: list[tuple[Shard, EventHistory, int, list[int]]]) -> list[np.ndarray]:
        """Scores of each (shard, request) in one batch; ids outside a request's shard map to the
        OOV row, as on the phone."""
        views: dict[int, ShardView] = {}
        encoded = []
        for shard, history, request_time, candidate_ids in requests:
            if id(shard) not in views:
                views[id(shard)] = ShardView(self.ckpt, shard)
            encoded.append((shard, encode(views[id(shard)].encoding, history, request_time, candidate_ids)))
        return self.scores_encoded(encoded)

    def scores_many(self, shard: Shard, requests: list[Request]) -> list[np.ndarray]:
        return self.scores_mixed([(shard, *r) for r in requests])

    def scores_encoded(self, requests: list[tuple[Shard, EncodedRequest]], width: int = 0) -> list[np.ndarray]:
        """Scores of requests already encoded against their shard (local rows), in one eager batch
        whose candidates are padded to at least `width`. Float sums depend on the batch's shape
        and a row's place in it: see `score_golden` for the same bytes whatever the batching."""
        item_category = self.ckpt.item_category
        rows: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, StaticPrior]] = {}
        encoded = []
        # `score_golden` fills short batches with copies of one request (the same object): its
        # prior, a whole-shard computation, is computed once.
        done: dict[int, tuple] = {}
        for shard, req in requests:
            if id(req) in done:
                encoded.append(done[id(req)])
                continue
            if id(shard) not in rows:
                full_item = np.concatenate([[PADDING_ROW, OOV_ROW], shard.item_rows])
                # A candidate's category as the program sees it: OOV when the bundle does not carry
                # it (over the category capacity), exactly like an unknown id on the phone.
                cand_cat = np.where(full_item >= RESERVED_ROWS, item_category[full_item], OOV_ROW)
                _, found = sorted_lookup(shard.category_rows, cand_cat)
                rows[id(shard)] = (full_item, np.concatenate([[PADDING_ROW, OOV_ROW], shard.category_rows]),
                                   np.where(found, cand_cat, OOV_ROW), StaticPrior(prior_tables(shard)))
            full_item, full_cat, cat_of_local, prior = rows[id(shard)]
            # The prior as the program computes it: re-ranked from this request's history.
            full_prior = prior.prior(req.hist_items, req.hist_timestamps)
            encoded.append((shard.user_row, full_item[req.hist_items], full_cat[req.hist_categories], req.hist_behaviors,
                            req.hist_timestamps, int(req.request_time[0]), full_item[req.candidates],
                            cat_of_local[req.candidates], full_prior[req.candidates]))
            done[id(req)] = encoded[-1]
        width = max(width, *(len(e[6]) for e in encoded))
        cand_items = np.full((len(encoded), width), OOV_ROW, np.int64)
        cand_cats = np.full((len(encoded), width), OOV_ROW, np.int64)
        priors = np.zeros((len(encoded), width), np.float32)
        for i, e in enumerate(encoded):
            n = len(e[6])
            cand_items[i, :n], cand_cats[i, :n], priors[i, :n] = e[6], e[7], e[8]
        columns = list(zip(*[e[:6] for e in encoded]))
        tensors = [torch.from_numpy(np.asarray(columns[i], dtype=np.int64)) for i in range(6)]
        with torch.inference_mode():
            logits = self.model.rank(*tensors, torch.from_numpy(cand_items), torch.from_numpy(cand_cats), logits=True)
            scores = torch.sigmoid(logits + torch.from_numpy(priors)).numpy().astype(np.float64)
        return [scores[i, : len(e[6])] for i, e in enumerate(encoded)]


GOLDEN_BATCH_USERS = 64  # users per eager batch of golden cases (fixed: see `score_golden`)


def score_golden(reference: EagerReference, users: list[tuple[ShardView, Shard, list[GoldenCase]]]) -> list[list[EncodedRequest]]:
    """Fill in the scores of several users' golden cases; returns their encoded requests (for the replay).

    golden.json must have the same bytes whether a user is built alone or among thousands (issue
    11), but an eager batch's float sums depend on its shape (BLAS kernels are chosen by size) and
    on where a row sits (vector loops finish their last elements, and each thread's share, with
    scalar code). So every batch has the same shape, whatever the number of users: exactly
    GOLDEN_BATCH_USERS users' cases (short batches filled with copies of their first request),
    every case padded to the same number of candidates, plus one filler user at the end that
    takes the vector loops' tails, scored on one thread so that no loop is split between threads.
    The batch-invariance test builds users alone, in batches and in reversed batches."""
    if any(len(cases) != GOLDEN_CASES for _, _, cases in users):
        raise ValueError(f"every user needs {GOLDEN_CASES} golden cases: batches are cut at user boundaries")
    encoded = [[encode(view.encoding, c.history, c.request_time, c.candidates) for c in cases] for view, _, cases in users]
    flat = [(shard, req) for (_, shard, _), reqs in zip(users, encoded) for req in reqs]
    cases = [c for _, _, user_cases in users for c in user_cases]
    per_batch = GOLDEN_BATCH_USERS * GOLDEN_CASES
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, len(flat), per_batch):
            block = flat[start : start + per_batch]
            filled = block + [block[0]] * (per_batch + GOLDEN_CASES - len(block))
            scores = reference.scores_encoded(filled, width=GOLDEN_CANDIDATES + 1)
            for case, row in zip(cases[start : start + per_batch], scores):
                case.scores = row.tolist()
    finally:
        torch.set_num_threads(threads)
    return encoded


def replay_golden(manifest: Manifest, golden: GoldenSet, method) -> float:
    """Max abs difference between a runtime method's scores and the golden scores."""
    return replay_encoded(golden, [encode(manifest, c.history, c.request_time, c.candidates) for c in golden.cases],
                          method)


def replay_encoded(golden: GoldenSet, requests: list[EncodedRequest], method) -> float:
    """`replay_golden` with the cases already encoded (the build encodes them once for eager and runtime)."""
    return golden_max_diff(golden.cases, requests, lambda request: run_method(method, request))
