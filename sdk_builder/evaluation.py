"""Recommendation quality measured the way the product is used: a user's shard ranked on the phone.

Three measurements share the metric code here:
- `ValidationRanking` (training time, eager model): each validation user's validation event is the
  target, the shard is cut from the events before it, the model ranks the shard. Cheap enough to
  run at every validation, so checkpoints can be chosen by it and the run can store how the model
  compares with popularity (the build-time quality gate reads that).
- `evaluate_on_device` (after training, real bundles): each test user's held-out last K events
  (`prepare(holdout_last=K)`: never trained on, never in a shard) are the targets; the user's real
  stamped bundle ranks its whole shard in the ExecuTorch runtime from the last <= 20 pre-holdout
  events, next to popularity, the shard's own order and the full model over the whole catalogue.
- the refresh measurement (`stream_split`, `stream_quality`; bundles in `sdk_builder.ondevice`):
  events streamed to the phone after its bundle was built, ranked by the frozen, the on-device
  refreshed and the server-rebuilt bundle (docs/quality.md).

Items the user already interacted with are never recommended (removed before ranking); held-out
events on such items are not targets.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from model.tbsm import PADDING_ROW, RESERVED_ROWS, TBSM
from sdk_builder.data.dataset import PreparedData, prepare, split_future
from sdk_builder.shard import ShardIndex, ShardPolicy, policy_prior

if TYPE_CHECKING:  # annotations only: events imports pyarrow (~0.8 s)
    from sdk_builder.data.events import EventLog

CUTOFFS = (10, 50)
PRIMARY_METRIC = "hr@10"
VALIDATION_USERS = 1000
EAGER_PAIRS_PER_CALL = 1 << 15
BLEND_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0)


def ranking_metrics(ranked: np.ndarray, targets: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Per-user HR@10, HR@50, NDCG@10 and recall@50 of `ranked` (users x >= 50 item rows, best
    first, -1 for no item) against each user's distinct target item rows."""
    out = {"hr@10": [], "hr@50": [], "ndcg@10": [], "recall@50": []}
    discounts = 1.0 / np.log2(np.arange(2, 12))
    for row, target in zip(ranked, targets):
        hit = np.isin(row[: max(CUTOFFS)], target) & (row[: max(CUTOFFS)] >= 0)
        out["hr@10"].append(float(hit[:10].any()))
        out["hr@50"].append(float(hit[:50].any()))
        ideal = discounts[: min(len(target), 10)].sum()
        out["ndcg@10"].append(float((hit[:10] * discounts).sum() / ideal) if ideal else 0.0)
        out["recall@50"].append(float(hit[:50].sum() / len(target)) if len(target) else 0.0)
    return {k: np.asarray(v) for k, v in out.items()}


def bootstrap_interval(values: np.ndarray, *, seed: int = 0, rounds: int = 1000) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over users."""
    if not len(values):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def top_unseen(scores: np.ndarray, items: np.ndarray, seen: np.ndarray, k: int = max(CUTOFFS)) -> np.ndarray:
    """The k best `items` by `scores` (ties by item row), leaving out `seen`; -1 pads."""
    keep = ~np.isin(items, seen)
    items, scores = items[keep], scores[keep]
    best = np.lexsort((items, -scores))[:k]
    return np.pad(items[best], (0, k - len(best)), constant_values=-1)


@dataclass
class UserRequest:
    """What the phone knows when it ranks: events before the request, oldest first."""

    user_row: int
    history_end: int  # index into the event arrays: the events before it are known
    request_time: int
    targets: np.ndarray  # distinct item rows the user interacts with next, never seen before


def history_tensors(data: PreparedData, requests: list[UserRequest], history: int) -> list[torch.Tensor]:
    """(users, request times, item/category/behaviour/timestamp windows) of the last `history`
    known events of each request, left-padded."""
    ends = np.array([r.history_end for r in requests], np.int64)
    starts = data.user_start[np.array([r.user_row for r in requests])]
    idx = ends[:, None] + np.arange(-history, 0)
    valid = idx >= starts[:, None]
    idx = np.where(valid, idx, 0)
    take = lambda a, fill: torch.from_numpy(np.where(valid, a[idx], fill).astype(np.int64))  # noqa: E731
    return [torch.tensor([r.user_row for r in requests]), take(data.item_rows, PADDING_ROW),
            take(data.cat_rows, PADDING_ROW), take(data.behaviors, 0), take(data.timestamps, 0),
            torch.tensor([r.request_time for r in requests])]


@torch.no_grad()
def eager_scores(model: TBSM, data: PreparedData, requests: list[UserRequest], candidates: list[np.ndarray], *,
                 logits: bool = False) -> list[np.ndarray]:
    """The full eager model's probabilities (or logits) of each request's candidate item rows."""
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    i = 0
    while i < len(requests):
        width = max(len(candidates[i]), 1)
        j = min(len(requests), i + max(1, EAGER_PAIRS_PER_CALL // width))
        users, items, cats, behaviors, stamps, request_time = history_tensors(data, requests[i:j], model.cfg.history)
        n = max(len(c) for c in candidates[i:j])
        cand = np.stack([np.pad(c, (0, n - len(c)), constant_values=1) for c in candidates[i:j]]).astype(np.int64)
        cand_t = torch.from_numpy(cand)
        scores = model.rank(users, items, cats, behaviors, stamps, request_time, cand_t,
                            torch.from_numpy(data.item_category[cand]), logits=logits).numpy()
        out += [scores[k, : len(c)] for k, c in enumerate(candidates[i:j])]
        i = j
    model.train(was_training)
    return out


class ValidationRanking:
    """HR@10 of the eager model ranking each validation user's shard, next to popularity order.

    Targets are validation positives whose item the user has not seen before; shards are cut from
    `data.training_event_mask()` statistics and the user's events before the target, exactly as a
    bundle built at that moment would be. Computed once; scoring a model costs one eager pass.
    """

    def __init__(self, data: PreparedData, policy: ShardPolicy | None = None, *, max_users: int = VALIDATION_USERS,
                 seed: int = 0) -> None:
        self.data = data
        self.policy = policy or ShardPolicy()
        val = data.splits.get("validation")
        requests: list[UserRequest] = []
        if val is not None and len(val):
            positive = val.negative_item < 0
            users, cands = val.user[positive], val.candidate[positive]
            if len(users) > max_users:
                pick = np.sort(np.random.default_rng(seed).choice(len(users), max_users, replace=False))
                users, cands = users[pick], cands[pick]
            for u, c in zip(users.tolist(), cands.tolist()):
                start = int(data.user_start[u])
                target = int(data.item_rows[c])
                if c > start and target not in data.item_rows[start:c]:
                    requests.append(UserRequest(u, c, int(data.timestamps[c]), np.array([target])))
        self.requests = requests
        self.index = ShardIndex(data, self.policy, event_mask=data.training_event_mask()) if requests else None
        self.shards, self.policy_order = [], []
        for r in requests:
            start = int(data.user_start[r.user_row])
            ranked, _ = self.index.select_ranked(data.item_rows[start : r.history_end], data.cat_rows[start : r.history_end])
            self.policy_order.append(ranked)
            self.shards.append(np.sort(ranked))
        self.seen = [data.item_rows[int(data.user_start[r.user_row]) : r.history_end] for r in requests]
        self.baselines = {}
        if requests:
            pop = [top_unseen(self.index.popularity[s].astype(np.float64), s, seen) for s, seen in zip(self.shards, self.seen)]
            self.baselines["popularity"] = float(ranking_metrics(np.stack(pop), self._targets())[PRIMARY_METRIC].mean())

    def _targets(self) -> list[np.ndarray]:
        return [r.targets for r in self.requests]

    def __len__(self) -> int:
        return len(self.requests)

    def __call__(self, model: TBSM) -> dict[str, float]:
        if not self.requests:
            return {}
        logits = eager_scores(model, self.data, self.requests, self.shards, logits=True)
        return {"val_hr10": self.hr10(logits), "val_hr10_popularity": self.baselines["popularity"],
                "val_ranking_users": len(self.requests)}

    def hr10(self, scores: list[np.ndarray]) -> float:
        ranked = np.stack([top_unseen(s, shard, seen) for s, shard, seen in zip(scores, self.shards, self.seen)])
        return float(ranking_metrics(ranked, self._targets())[PRIMARY_METRIC].mean())

    def choose_blend(self, model: TBSM) -> dict[str, float]:
        """The weight of the shard policy's prior in the shipped score, sigmoid(logit + weight *
        prior), chosen on validation HR@10 (ties: the smaller weight, so the model keeps the most say)."""
        logits = eager_scores(model, self.data, self.requests, self.shards, logits=True)
        priors = [policy_prior(order)[1] for order in self.policy_order]
        results = {w: self.hr10([lg + w * pr for lg, pr in zip(logits, priors)]) for w in BLEND_WEIGHTS}
        best = max(BLEND_WEIGHTS, key=lambda w: (results[w], -w))
        policy = self.hr10(priors)
        return {"blend_weight": best, "blended": results[best], "model_alone": results[0.0], "policy_order": policy}


def future_requests(data: PreparedData, users: np.ndarray | None = None) -> list[UserRequest]:
    """One request per user with held-out events: history = every event kept for training, request
    time = the first held-out event's, targets = held-out items the user had not seen before."""
    future = data.future
    if future is None:
        raise ValueError("the run holds out no events: prepare/train it with --holdout-last K")
    n_future = np.diff(future.start)
    candidates = np.flatnonzero(n_future > 0) if users is None else np.asarray(users)
    requests = []
    for u in candidates.tolist():
        sl = data.user_events(u)
        held = future.item_rows[future.of(u)]
        targets = np.unique(held[(held >= RESERVED_ROWS) & ~np.isin(held, data.item_rows[sl])])
        requests.append(UserRequest(u, sl.stop, int(future.timestamps[future.start[u]]), targets))
    return requests


ROWS = {
    "popularity": "(a) global popularity, whole catalogue",
    "shard_popularity": "(a') the shard in popularity order",
    "shard_policy": "(b) the shard in its policy order (no model)",
    "server": "(c) full model, whole catalogue, eager (server upper bound)",
    "shard_eager": "the model alone ranking the shard, eager",
    "shard_blend": "model + shard policy prior (what a bundle ranks by), eager",
    "bundle_fp32": "(d) fp32 bundle in the ExecuTorch runtime",
    "bundle_int8": "(e) int8 bundle in the ExecuTorch runtime",
}


@dataclass
class OnDeviceReport:
    users: int
    skipped_no_target: int
    targets: int
    rows: dict[str, dict] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    shard_coverage: float = float("nan")

    def summary(self) -> dict:
        return {"users": self.users, "skipped_no_target": self.skipped_no_target, "targets": self.targets,
                "shard_coverage": self.shard_coverage, "rows": self.rows, "seconds": self.seconds}


def _summarise(per_user: dict[str, np.ndarray], seed: int) -> dict:
    return {name: {"mean": float(v.mean()), "ci95": list(bootstrap_interval(v, seed=seed))} for name, v in per_user.items()}


def evaluate_on_device(model: TBSM, data: PreparedData, *, policy: ShardPolicy | None = None,
                       users: np.ndarray | None = None, max_users: int | None = None, seed: int = 0,
                       rows: tuple[str, ...] = tuple(ROWS), bundle_ranker: Callable | None = None,
                       blend_weight: float = 0.0) -> OnDeviceReport:
    """The on-device evaluation (module docstring). `bundle_ranker(recipe, requests, shards)` returns
    each request's shard scores from real bundles (see `sdk_builder.ondevice`); without it the
    bundle rows are left out. `blend_weight`: the run's weight of the policy prior (`shard_blend`)."""
    policy = policy or ShardPolicy()
    requests = future_requests(data, users)
    if max_users is not None and len(requests) > max_users:
        pick = np.sort(np.random.default_rng(seed).choice(len(requests), max_users, replace=False))
        requests = [requests[i] for i in pick]
    with_target = [r for r in requests if len(r.targets)]
    report = OnDeviceReport(users=len(with_target), skipped_no_target=len(requests) - len(with_target),
                            targets=int(sum(len(r.targets) for r in with_target)))
    requests = with_target
    if not requests:
        return report
    targets = [r.targets for r in requests]
    seen = [data.item_rows[data.user_events(r.user_row)] for r in requests]
    index = ShardIndex(data, policy)  # every kept event: the held-out ones are not in `data`
    started = time.perf_counter()
    ordered = [index.select_ranked(*_events(data, r))[0] for r in requests]
    shards = [np.sort(o) for o in ordered]
    report.seconds["shards"] = time.perf_counter() - started
    report.shard_coverage = float(sum(np.isin(t, s).sum() for t, s in zip(targets, shards)) / report.targets)
    ranked: dict[str, np.ndarray] = {}
    if "popularity" in rows:
        ranked["popularity"] = np.stack([top_unseen(-np.arange(len(index.popular), dtype=np.float64), index.popular, s)
                                         for s in seen])
    if "shard_popularity" in rows:
        ranked["shard_popularity"] = np.stack([top_unseen(index.popularity[sh].astype(np.float64), sh, s)
                                               for sh, s in zip(shards, seen)])
    if "shard_policy" in rows:
        ranked["shard_policy"] = np.stack([top_unseen(-np.arange(len(o), dtype=np.float64), o, s) for o, s in zip(ordered, seen)])
    if "shard_eager" in rows or "shard_blend" in rows:
        started = time.perf_counter()
        logits = eager_scores(model, data, requests, shards, logits=True)
        ranked["shard_eager"] = np.stack([top_unseen(lg, sh, s) for lg, sh, s in zip(logits, shards, seen)])
        priors = [policy_prior(o)[1] for o in ordered]
        ranked["shard_blend"] = np.stack([top_unseen(lg + blend_weight * pr, sh, s)
                                          for lg, pr, sh, s in zip(logits, priors, shards, seen)])
        report.seconds["shard_eager"] = time.perf_counter() - started
    if "server" in rows:
        started = time.perf_counter()
        catalogue = np.arange(RESERVED_ROWS, data.items.rows)
        scores = eager_scores(model, data, requests, [catalogue] * len(requests), logits=True)
        ranked["server"] = np.stack([top_unseen(sc, catalogue, s) for sc, s in zip(scores, seen)])
        report.seconds["server"] = time.perf_counter() - started
    if bundle_ranker is not None:
        for name, recipe in (("bundle_fp32", "xnnpack"), ("bundle_int8", "int8")):
            if name not in rows:
                continue
            started = time.perf_counter()
            scores = bundle_ranker(recipe, requests, shards)
            ranked[name] = np.stack([top_unseen(sc, c, s) for sc, c, s in zip(scores, shards, seen)])
            report.seconds[name] = time.perf_counter() - started
    for name in ROWS:
        if name in ranked:
            report.rows[name] = _summarise(ranking_metrics(ranked[name], targets), seed)
    return report


def prior_weight(checkpoint_payload: dict) -> float:
    """The weight of the shard policy's prior a run's bundles rank with (0 for runs without one)."""
    return float((checkpoint_payload.get("ranking_validation") or {}).get("blend_weight", 0.0))


def _events(data: PreparedData, request: UserRequest) -> tuple[np.ndarray, np.ndarray]:
    start = int(data.user_start[request.user_row])
    return data.item_rows[start : request.history_end], data.cat_rows[start : request.history_end]


METRICS = ("hr@10", "hr@50", "ndcg@10", "recall@50")


def metrics_table(rows: dict[str, dict], label: Callable[[str], str]) -> str:
    """A markdown table: one row per ranking (`label(name)`), each metric with its 95% interval."""
    lines = ["| ranking | " + " | ".join(METRICS) + " |\n|---|" + "---:|" * len(METRICS)]
    for name, metrics in rows.items():
        cells = [f"{m['mean']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]" for m in (metrics[k] for k in METRICS)]
        lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_table(report: OnDeviceReport) -> str:
    return metrics_table(report.rows, ROWS.__getitem__)


def ratios(report: OnDeviceReport, metric: str = PRIMARY_METRIC) -> dict[str, float]:
    """The quality issue's targets as ratios of `metric`: bundle vs popularity, vs the shard's own
    order, vs the server; int8 minus fp32."""
    mean = {name: r[metric]["mean"] for name, r in report.rows.items()}
    out = {}
    bundle = mean.get("bundle_fp32", mean.get("shard_blend"))
    if bundle is None:
        return out
    for name, key in (("popularity", "vs_popularity"), ("shard_policy", "vs_shard_policy"), ("server", "vs_server")):
        if mean.get(name):
            out[key] = bundle / mean[name]
    if "bundle_int8" in mean and "bundle_fp32" in mean:
        out["int8_minus_fp32"] = mean["bundle_int8"] - mean["bundle_fp32"]
    return out


def plot_report(report: OnDeviceReport, path: Path, title: str = "") -> None:
    """Grouped bars of every metric per ranking, with the bootstrap intervals as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.rows)
    fig, ax = plt.subplots(figsize=(13, 4.5))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        means = [report.rows[name][m]["mean"] for m in METRICS]
        lo = [mu - report.rows[name][m]["ci95"][0] for mu, m in zip(means, METRICS)]
        hi = [report.rows[name][m]["ci95"][1] - mu for mu, m in zip(means, METRICS)]
        ax.bar(np.arange(len(METRICS)) + k * width, means, width, yerr=[lo, hi], capsize=2, label=ROWS[name])
    ax.set_xticks(np.arange(len(METRICS)) + 0.4 - width / 2, METRICS)
    ax.set_ylabel("mean over users (95% bootstrap interval)")
    ax.set_title(title or f"On-device ranking of held-out events, {report.users} users")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90, metadata={"Software": None})
    plt.close(fig)
    tmp.replace(path)


# -- On-device refresh (issue 13): a stream of events reaches the phone after its bundle was built --

@dataclass
class StreamUser:
    """One user of the stream protocol (`stream_split`)."""

    user_row: int
    stream: slice  # the user's streamed events: rows of `StreamSplit.stream`, oldest first
    request_time: int  # the first target event's time: the phone ranks just before it
    targets: np.ndarray  # distinct item rows of the next events, in neither the kept nor the streamed events
    seen: np.ndarray  # item rows the phone knows the user touched (kept + streamed): never recommended


@dataclass
class StreamSplit:
    """Each user's last `stream + next_events` events are held out of everything (training, id
    maps, popularity, shards): the first `stream` reach the phone one by one after the bundle was
    built from `data`, the new items of the `next_events` after them are the targets."""

    data: PreparedData  # kept events only: the checkpoint and the frozen bundles (a) are built from it
    stream: EventLog  # every held-out user's streamed events (global ids, user then time order)
    users: list[StreamUser]  # users with at least one target
    skipped_no_target: int


def stream_split(events: EventLog, *, stream: int = 20, next_events: int = 10, **prepare_args) -> StreamSplit:
    """`prepare(events, holdout_last=stream + next_events, **prepare_args)`, the held-out events cut
    into the stream and the targets (`StreamSplit`)."""
    if stream < 1 or next_events < 1:
        raise ValueError("stream and next_events must be at least 1")
    held_out = stream + next_events
    data = prepare(events, holdout_last=held_out, **prepare_args)
    held = split_future(events, held_out)[1]  # the rows of data.future, with their global ids
    future = data.future
    known = future.item_rows >= RESERVED_ROWS
    if len(held) != len(future.item_rows) or not np.array_equal(held.item[known], data.items.global_id(future.item_rows[known])):
        raise AssertionError("split_future and prepare disagree on the held-out events")
    counts = np.diff(future.start)
    position = np.arange(len(held)) - np.repeat(future.start[:-1], counts)
    stream_log = held.take(position < stream)
    users, skipped, offset = [], 0, 0
    for u in np.flatnonzero(counts).tolist():
        first = int(future.start[u])
        streamed = future.item_rows[first : first + stream]
        seen = np.unique(np.concatenate([data.item_rows[data.user_events(u)], streamed]))
        nxt = future.item_rows[first + stream : first + held_out]
        targets = np.unique(nxt[(nxt >= RESERVED_ROWS) & ~np.isin(nxt, seen)])
        if len(targets):
            users.append(StreamUser(u, slice(offset, offset + stream), int(future.timestamps[first + stream]), targets,
                                    seen[seen >= RESERVED_ROWS]))
        else:
            skipped += 1
        offset += stream
    return StreamSplit(data, stream_log, users, skipped)


STREAM_ROWS = {
    "frozen": "(a) frozen bundle, built before the stream",
    "refreshed": "(b) frozen bundle, user state refreshed on the phone as the stream arrives",
    "rebuilt": "(c) bundle rebuilt on the server with the stream, same checkpoint",
    "rebuilt_in_frozen_shard": "(c) counting only targets inside (a)'s shard",
    "patched": "(c') rebuilt from (a) as `build --delta-from` does: shard and co-visit lists kept within the slack",
    "frozen_policy_order": "(a)'s shard in its build-time policy order (no model)",
    "frozen_phone_order": "(a)'s shard in the policy order recomputed from the phone's events (no model)",
}


def policy_orders(split: StreamSplit, users: list[StreamUser], frozen_shards: list[np.ndarray],
                  policy: ShardPolicy) -> dict[str, list[np.ndarray]]:
    """Scores (minus the position) of each user's frozen shard items in the shard policy's order as
    stamped at build time ("frozen_policy_order") and as recomputed from every event the phone has,
    kept and streamed, with the build-time statistics ("frozen_phone_order"; items the new order
    lacks follow in the build-time order): how much a policy prior computed on the phone instead
    of stamped would gain, with no model."""
    data, log = split.data, split.stream
    index = ShardIndex(data, policy)
    out: dict[str, list[np.ndarray]] = {"frozen_policy_order": [], "frozen_phone_order": []}
    for user, shard in zip(users, frozen_shards):
        kept = data.user_events(user.user_row)
        before, _ = index.select_ranked(data.item_rows[kept], data.cat_rows[kept])
        now, _ = index.select_ranked(np.concatenate([data.item_rows[kept], data.items.lookup(log.item[user.stream])]),
                                     np.concatenate([data.cat_rows[kept], data.categories.lookup(log.category[user.stream])]))
        for name, order in (("frozen_policy_order", before), ("frozen_phone_order", np.concatenate([now, before]))):
            order = order[np.isin(order, shard)]
            _, first = np.unique(order, return_index=True)
            order = order[np.sort(first)]
            position = np.full(len(shard), len(shard), np.float64)
            position[np.searchsorted(shard, order)] = np.arange(len(order))
            out[name].append(-position)
    return out


@dataclass
class StreamReport:
    users: int
    skipped_no_target: int
    targets: int
    coverage: dict[str, float]  # fraction of the targets inside each kind of bundle's shard
    rows: dict[str, dict] = field(default_factory=dict)
    gap: dict[str, float] = field(default_factory=dict)  # HR@10 gap (a) -> (c), what (b) and the shard explain
    stream_events: dict[str, int] = field(default_factory=dict)  # extend_events' counts of the streamed events

    def summary(self) -> dict:
        return {"users": self.users, "skipped_no_target": self.skipped_no_target, "targets": self.targets,
                "coverage": self.coverage, "rows": self.rows, "gap": self.gap, "stream_events": self.stream_events}


def gap_recovered(frozen: np.ndarray, middle: np.ndarray, rebuilt: np.ndarray, *, seed: int = 0,
                  rounds: int = 1000) -> tuple[float, float, float]:
    """(mean(middle - frozen) / mean(rebuilt - frozen), 95% paired-bootstrap interval) over users;
    NaN where the gap is not positive (the interval: where any resample's gap is not)."""
    def ratio(idx):
        gap = rebuilt[idx].mean(axis=-1) - frozen[idx].mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(gap > 0, (middle[idx].mean(axis=-1) - frozen[idx].mean(axis=-1)) / gap, np.nan)

    point = float(ratio(np.arange(len(frozen))))
    samples = ratio(np.random.default_rng(seed).integers(0, len(frozen), size=(rounds, len(frozen))))
    if np.isnan(samples).any():
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return point, float(lo), float(hi)


def stream_quality(split: StreamSplit, users: list[StreamUser], shards: dict[str, list[np.ndarray]],
                   scores: dict[str, list[np.ndarray]], *, seed: int = 0) -> StreamReport:
    """The refresh measurement from each user's shard (item rows, sorted) and its scores: `shards`
    and `scores` keyed "frozen" (a) and "rebuilt" (c), `scores` also "refreshed" (b, on (a)'s shard)
    when measured. The part of the gap the frozen shard cannot close: (c)'s HR@10 minus (c)'s
    HR@10 counting only targets inside (a)'s shard (no state of (a) can rank an item it lacks)."""
    targets = [u.targets for u in users]
    n_targets = int(sum(len(t) for t in targets))
    report = StreamReport(users=len(users), skipped_no_target=split.skipped_no_target, targets=n_targets,
                          coverage={k: float(sum(np.isin(t, s).sum() for t, s in zip(targets, shards[k])) / max(n_targets, 1))
                                    for k in shards})
    per_user: dict[str, dict[str, np.ndarray]] = {}
    for name in STREAM_ROWS:
        shard_of = "frozen" if name.startswith(("refreshed", "frozen")) else name
        if name not in scores or shard_of not in shards:
            continue
        ranked = np.stack([top_unseen(sc, sh, u.seen) for sc, sh, u in zip(scores[name], shards[shard_of], users)])
        per_user[name] = ranking_metrics(ranked, targets)
        if name == "rebuilt" and "frozen" in shards:
            inside = [t[np.isin(t, s)] for t, s in zip(targets, shards["frozen"])]
            per_user["rebuilt_in_frozen_shard"] = ranking_metrics(ranked, inside)
    report.rows = {name: _summarise(per_user[name], seed) for name in STREAM_ROWS if name in per_user}
    if "frozen" in per_user and "rebuilt" in per_user:
        a, c = per_user["frozen"][PRIMARY_METRIC], per_user["rebuilt"][PRIMARY_METRIC]
        inside = per_user["rebuilt_in_frozen_shard"][PRIMARY_METRIC]
        parts = {"a_to_c": c - a, "outside_frozen_shard": c - inside}
        if "refreshed" in per_user:
            parts["refresh_gain"] = per_user["refreshed"][PRIMARY_METRIC] - a
        if "patched" in per_user:
            parts["delta_cost"] = per_user["patched"][PRIMARY_METRIC] - c
        if "frozen_phone_order" in per_user:
            parts["phone_order_gain"] = (per_user["frozen_phone_order"][PRIMARY_METRIC]
                                         - per_user["frozen_policy_order"][PRIMARY_METRIC])
        for name, diff in parts.items():  # HR@10 differences, paired over users
            report.gap[name] = float(diff.mean())
            report.gap[f"{name}_ci95"] = list(bootstrap_interval(diff, seed=seed))
        if "refreshed" in per_user:
            share, lo, hi = gap_recovered(a, per_user["refreshed"][PRIMARY_METRIC], c, seed=seed)
            report.gap["recovered_by_refresh"] = share
            report.gap["recovered_by_refresh_ci95"] = [lo, hi]
    return report


def format_stream_table(report: StreamReport) -> str:
    return metrics_table(report.rows, STREAM_ROWS.__getitem__)
