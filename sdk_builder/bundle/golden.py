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
from sdk_builder.client import encode
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import (
    BEHAVIOR_CODES, BEHAVIOR_NAMES, MAX_HISTORY, Event, EventHistory, GoldenCase, GoldenSet, IdShard, Manifest,
)
from sdk_builder.program import Shard, program_spec
from sdk_builder.runs import LoadedCheckpoint

GOLDEN_TOLERANCE = 1e-5
GOLDEN_CANDIDATES = 16

Request = tuple[EventHistory, int, list[int]]  # history, request time, global candidate ids


class ShardView:
    """The parts of a manifest `encode` needs, before the manifest itself exists."""

    def __init__(self, ckpt: LoadedCheckpoint, shard: Shard) -> None:
        self.items = IdShard(ids=ckpt.items.global_id(shard.item_rows).tolist())
        self.categories = IdShard(ids=ckpt.categories.global_id(shard.category_rows).tolist())
        self.behaviors = dict(BEHAVIOR_CODES)
        self.program = program_spec()


def golden_requests(ckpt: LoadedCheckpoint, data: PreparedData, seed: int, user_id: int, shard: Shard) -> list[GoldenCase]:
    """Real histories of the user (full, short, empty, all-OOV) with shard and unknown candidates (no scores yet)."""
    sl = data.user_events(shard.user_row)
    events = [
        Event(item_id=int(i), category_id=int(c), behavior=BEHAVIOR_NAMES[int(b)], timestamp=int(t))
        for i, c, b, t in zip(ckpt.items.global_id(data.item_rows[sl][-MAX_HISTORY:]),
                              ckpt.categories.global_id(data.cat_rows[sl][-MAX_HISTORY:]),
                              data.behaviors[sl][-MAX_HISTORY:], data.timestamps[sl][-MAX_HISTORY:])
    ]
    last_time = events[-1].timestamp if events else 0
    rng = np.random.default_rng([seed, user_id])
    shard_ids = ckpt.items.global_id(shard.item_rows)
    picks = np.sort(rng.choice(len(shard_ids), min(GOLDEN_CANDIDATES, len(shard_ids)), replace=False))
    unknown_id = int(ckpt.items.ids.max()) + 1 + int(rng.integers(0, 1000))
    candidates = [int(x) for x in shard_ids[picks]] + [unknown_id]
    foreign = [e.model_copy(update={"item_id": unknown_id + 1 + k}) for k, e in enumerate(events[-5:])]
    histories = {"full_history": events, "short_history": events[-3:], "empty_history": [], "all_oov_history": foreign}
    return [GoldenCase(name=name, history=EventHistory(user_id=user_id, events=hist), request_time=last_time + 3600,
                       candidates=candidates, scores=[]) for name, hist in histories.items()]


class EagerReference:
    """The full eager model on requests as the phone encodes them, in one batch: the
    sigmoid of its logit plus the shard's prior of the candidate, exactly what a program returns."""

    def __init__(self, model: TBSM, ckpt: LoadedCheckpoint) -> None:
        self.model, self.ckpt = model, ckpt

    def scores_mixed(self, requests: list[tuple[Shard, EventHistory, int, list[int]]]) -> list[np.ndarray]:
        """Scores of each (shard, request); ids outside a request's shard map to the OOV row, as on the phone."""
        item_category = self.ckpt.item_category
        encoded = []
        for shard, history, request_time, candidate_ids in requests:
            req = encode(ShardView(self.ckpt, shard), history, request_time, candidate_ids)
            full_item = np.concatenate([[PADDING_ROW, OOV_ROW], shard.item_rows])
            full_cat = np.concatenate([[PADDING_ROW, OOV_ROW], shard.category_rows])
            cand = full_item[req.candidates]
            # A candidate's category as the program sees it: OOV when the bundle does not carry it
            # (over the category capacity), exactly like an unknown id on the phone.
            cand_cat = np.where(cand >= RESERVED_ROWS, item_category[cand], OOV_ROW)
            cand_cat = np.where(np.isin(cand_cat, shard.category_rows), cand_cat, OOV_ROW)
            full_prior = np.full(len(full_item), shard.prior_of_unknown(), np.float32)
            if shard.item_prior is not None:
                full_prior[RESERVED_ROWS:] = shard.item_prior
            encoded.append((shard.user_row, full_item[req.hist_items], full_cat[req.hist_categories], req.hist_behaviors,
                            req.hist_timestamps, request_time, cand, cand_cat, full_prior[req.candidates]))
        width = max(len(e[6]) for e in encoded)
        pad = lambda a, fill: np.pad(a, (0, width - len(a)), constant_values=fill)  # noqa: E731
        columns = list(zip(*encoded))
        tensors = [torch.from_numpy(np.asarray(columns[i], dtype=np.int64)) for i in range(6)]
        cand_items = torch.from_numpy(np.stack([pad(a, OOV_ROW) for a in columns[6]]))
        cand_cats = torch.from_numpy(np.stack([pad(a, OOV_ROW) for a in columns[7]]))
        priors = torch.from_numpy(np.stack([pad(a, 0.0) for a in columns[8]]))
        scores = torch.sigmoid(self.model.rank(*tensors, cand_items, cand_cats, logits=True) + priors)
        return [scores[i, : len(e[6])].numpy().astype(np.float64) for i, e in enumerate(encoded)]

    def scores_many(self, shard: Shard, requests: list[Request]) -> list[np.ndarray]:
        return self.scores_mixed([(shard, *r) for r in requests])


def score_cases(reference: EagerReference, users: list[tuple[Shard, list[GoldenCase]]]) -> None:
    """Fill in the scores of golden cases of several users with one eager batch."""
    requests = [(shard, c.history, c.request_time, c.candidates) for shard, cases in users for c in cases]
    scores = iter(reference.scores_mixed(requests))
    for _, cases in users:
        for case in cases:
            case.scores = [float(x) for x in next(scores)]


def replay_golden(manifest: Manifest, golden: GoldenSet, method) -> float:
    """Max abs difference between a runtime method's scores and the golden scores."""
    worst = 0.0
    for case in golden.cases:
        request = encode(manifest, case.history, case.request_time, case.candidates)
        got = method.execute(request.tensors())[0].numpy().astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - np.asarray(case.scores)))))
    return worst
