"""Held-out events, ranking metrics, the validation ranking and the on-device evaluation with real bundles."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from model.tbsm import RESERVED_ROWS
from sdk_builder.data.dataset import NegativeSampler, PreparedData, prepare
from sdk_builder.evaluation import (
    ValidationRanking, bootstrap_interval, evaluate_on_device, future_requests, prior_weight, ranking_metrics, top_unseen,
)
from sdk_builder.data.events import EventLog
from sdk_builder.shard import ShardIndex, ShardPolicy
from sdk_builder.data.synthetic import generate_taobao_events
from sdk_builder.runs import run_warnings

pytestmark = pytest.mark.usefixtures("one_thread")
K = 5


@pytest.fixture(scope="module")
def events() -> EventLog:
    return generate_taobao_events(200, n_items=2000, n_categories=30, events_per_user=(8, 60), seed=21)


@pytest.fixture(scope="module")
def held(events) -> PreparedData:
    return prepare(events, seed=2, holdout_last=K, sampler=NegativeSampler("popularity", 2))


def test_ranking_metrics_by_hand():
    ranked = np.full((3, 50), -1)
    ranked[0, :3] = [5, 7, 9]  # targets 7 (rank 2) and 40 (rank 12)
    ranked[0, 11] = 40
    ranked[1, :2] = [1, 2]  # target 3 never ranked
    ranked[2, 20] = 8  # target 8 at rank 21
    m = ranking_metrics(ranked, [np.array([7, 40]), np.array([3]), np.array([8])])
    assert m["hr@10"].tolist() == [1.0, 0.0, 0.0]
    assert m["hr@50"].tolist() == [1.0, 0.0, 1.0]
    assert m["recall@50"].tolist() == [1.0, 0.0, 1.0]
    assert m["ndcg@10"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert m["ndcg@10"][1] == m["ndcg@10"][2] == 0.0
    lo, hi = bootstrap_interval(np.array([0.0, 1.0] * 50))
    assert lo < 0.5 < hi and hi - lo < 0.3


def test_top_unseen_drops_seen_items_and_breaks_ties_by_row():
    items = np.array([10, 11, 12, 13])
    got = top_unseen(np.array([0.5, 0.9, 0.5, 0.1]), items, seen=np.array([11]), k=4)
    assert got.tolist() == [10, 12, 13, -1]


def test_holdout_last_keeps_the_future_out_of_everything(events, held):
    n_all = np.bincount(np.unique(events.user, return_inverse=True)[1])
    assert held.info["held_out_events"] == int((n_all[n_all > K] * 0 + K).sum())
    assert held.num_events + held.info["held_out_events"] == len(events)
    future = held.future
    assert np.array_equal(np.diff(future.start), np.where(n_all > K, K, 0))
    for u in range(len(held.users.ids)):
        kept, fut = held.user_events(u), future.of(u)
        if fut.stop > fut.start:  # every held-out event is later than every kept one
            assert future.timestamps[fut].min() >= held.timestamps[kept].max()
    # items seen only in held-out events have no row: they map to OOV and can reach no shard
    only_future = np.setdiff1d(events.item, held.items.ids)
    assert len(only_future) and np.all(held.items.lookup(only_future) == 1)
    index = ShardIndex(held, ShardPolicy(shard_size=100))
    counts = np.bincount(held.item_rows, minlength=held.items.rows)
    counts[:RESERVED_ROWS] = 0
    assert np.array_equal(index.popularity, counts)
    # no sample's window reaches a held-out event
    for split in held.splits.values():
        assert np.all(split.candidate < held.user_start[split.user + 1])
    # saved and loaded with the future, and the fingerprint covers it
    assert held.fingerprint() != prepare(events, seed=2, holdout_last=K + 1,
                                         sampler=NegativeSampler("popularity", 2)).fingerprint()


def test_save_load_keeps_the_future(tmp_path, held):
    held.save(tmp_path / "d.npz")
    loaded = PreparedData.load(tmp_path / "d.npz")
    assert loaded.fingerprint() == held.fingerprint()
    assert np.array_equal(loaded.future.item_rows, held.future.item_rows)


def test_popularity_negatives_follow_popularity_and_are_never_touched(events):
    data = prepare(events, seed=4, sampler=NegativeSampler("popularity", 3))
    train = data.splits["train"]
    neg = train.negative_item >= 0
    assert neg.sum() == 3 * (~neg).sum()
    touched = set(zip(data.user_of_event().tolist(), data.item_rows.tolist()))
    assert not any((u, i) in touched for u, i in zip(train.user[neg].tolist(), train.negative_item[neg].tolist()))
    p = NegativeSampler("popularity").probabilities(data)
    assert p[:RESERVED_ROWS].sum() == 0 and p.sum() == pytest.approx(1.0)
    # popular items are drawn more often than unpopular ones
    counts = np.bincount(train.negative_item[neg], minlength=data.items.rows)
    top = np.argsort(-p)[:50]
    bottom = np.argsort(p)[RESERVED_ROWS: RESERVED_ROWS + 500]
    assert counts[top].mean() > 3 * counts[bottom].mean()


def test_validation_ranking_popularity_baseline_is_what_it_says(held):
    vr = ValidationRanking(held, ShardPolicy(shard_size=200))
    assert len(vr) > 50
    hits = []
    for r, shard, seen in zip(vr.requests, vr.shards, vr.seen):
        start = int(held.user_start[r.user_row])
        assert r.history_end < held.user_start[r.user_row + 1] and r.targets[0] not in held.item_rows[start : r.history_end]
        pop = vr.index.popularity
        candidates = [i for i in shard.tolist() if i not in set(seen.tolist())]
        best = sorted(candidates, key=lambda i: (-pop[i], i))[:10]
        hits.append(float(int(r.targets[0]) in best))
    assert vr.baselines["popularity"] == pytest.approx(np.mean(hits))


def test_run_warnings():
    history = [{"step": 10, "val_auc": 0.52}, {"step": 20, "val_auc": 0.51}]
    warnings = run_warnings(history, history[0], {"points": 40})
    assert any("first evaluation" in w for w in warnings)
    assert any("stalled" in w for w in warnings)
    assert any("40 test points" in w for w in warnings)
    healthy = [{"step": 10, "val_auc": 0.6}, {"step": 20, "val_auc": 0.7}]
    assert run_warnings(healthy, healthy[1], {"points": 400}) == []


@pytest.fixture(scope="module")
def held_run(tmp_path_factory, events):
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.runs import train_run

    out = tmp_path_factory.mktemp("held-run")
    data = prepare(events, seed=5, holdout_last=K, sampler=NegativeSampler("popularity", 2))
    metrics = train_run(data, out, TBSMConfig(**data.table_sizes(), init="normal"),
                        TrainConfig(epochs=1, seed=5, select_by="val_hr10"))
    return out, metrics


def test_training_records_the_ranking_validation(held_run):
    from sdk_builder.runs import load_checkpoint

    out, metrics = held_run
    rv = metrics["ranking_validation"]
    assert rv["metric"] == "hr@10" and rv["users"] > 0 and 0 <= rv["popularity"] <= 1
    best = next(h for h in metrics["history"] if h["step"] == metrics["best_step"])
    assert rv["model_alone"] == best["val_hr10"] == max(h["val_hr10"] for h in metrics["history"])
    # the chosen prior weight is the best of the grid, so the blend is never worse than the model alone
    assert rv["blended"] >= rv["model_alone"] and rv["blend_weight"] >= 0
    assert load_checkpoint(out).payload["ranking_validation"] == rv


def test_on_device_bundles_rank_like_the_eager_model(held_run):
    """fp32 and int8 bundles in the ExecuTorch runtime against the eager model on the same shards."""
    from sdk_builder.ondevice import BundleRanker
    from sdk_builder.runs import DATA, load_checkpoint

    out, _ = held_run
    ckpt = load_checkpoint(out)
    data = PreparedData.load(out / DATA)
    policy = ShardPolicy()
    ranker = BundleRanker(ckpt, data, policy)
    report = evaluate_on_device(ckpt.model, data, policy=policy, max_users=12, bundle_ranker=ranker,
                                blend_weight=prior_weight(ckpt.payload))
    assert report.users > 5
    rows = report.rows
    assert set(rows) == {"popularity", "shard_popularity", "shard_policy", "server", "shard_eager", "shard_blend",
                         "bundle_fp32", "bundle_int8"}
    for metric in ("hr@10", "hr@50", "ndcg@10", "recall@50"):
        assert rows["bundle_fp32"][metric]["mean"] == pytest.approx(rows["shard_blend"][metric]["mean"], abs=1e-9)
        lo, hi = rows["bundle_fp32"][metric]["ci95"]
        assert lo <= rows["bundle_fp32"][metric]["mean"] <= hi
    assert ranker.fallbacks["int8"] >= 0 and len(ranker.bundle_bytes["xnnpack"]) == report.users
    # scores themselves: sigmoid(a * eager logit + b * policy prior), a = 1 / (1 + w), b = w / (1 + w)
    from sdk_builder.evaluation import eager_scores
    from sdk_builder.shard import policy_prior

    w = prior_weight(ckpt.payload)
    requests = [r for r in future_requests(data) if len(r.targets)][:3]
    index = ShardIndex(data, policy)
    priors = [policy_prior(index.select_ranked(*_kept(data, r))[0]) for r in requests]
    shards = [items for items, _ in priors]
    runtime = ranker("xnnpack", requests, shards)
    logits = eager_scores(ckpt.model, data, requests, shards, logits=True)
    for got, logit, (_, prior) in zip(runtime, logits, priors):
        expected = 1 / (1 + np.exp(-(logit / (1 + w) + prior * w / (1 + w))))
        assert np.max(np.abs(got - expected)) < 1e-5


def _kept(data, request):
    start = int(data.user_start[request.user_row])
    return data.item_rows[start : request.history_end], data.cat_rows[start : request.history_end]


def test_evaluate_on_device_cli_writes_table_json_and_chart(held_run, tmp_path):
    from sdk_builder.cli import main

    out, _ = held_run
    # Bundle rows are covered above; here the command, its table, JSON and chart (eager rows only).
    result = CliRunner().invoke(main, ["evaluate", str(out), "--on-device", "--no-bundles", "--max-users", "6",
                                       "--report-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output[result.output.index("{"):])
    assert payload["users"] > 0 and "shard_blend" in payload["rows"] and "bundle_fp32" not in payload["rows"]
    assert json.loads((tmp_path / "ondevice.json").read_text())["rows"] == payload["rows"]
    assert (tmp_path / "ondevice.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_on_device_needs_held_out_events(trained_run):
    from sdk_builder.cli import main

    result = CliRunner().invoke(main, ["evaluate", str(trained_run), "--on-device", "--no-bundles"])
    assert result.exit_code != 0
    assert "--holdout-last" in result.output
