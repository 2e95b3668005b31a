"""Cold start: new users (held out of training entirely) ranked by the cold-start bundle vs popularity.

Per data set: a seeded fraction of the users is held out (`hold_out_users`: their events reach
neither training, the id maps, popularity nor the shard); the default model is trained on the
others; the cold-start bundle (`build --new-user`) is built once per population vector (mean of
the trained user rows, the zero row) and ranks its shard in the ExecuTorch runtime for each
held-out user:
  (i)  k = 0: no on-device history; request at the user's first event;
  (ii) k = `--known` (5): the user's first k events are on the device; request at event k.
Targets: the distinct items of the next `--next` events after the first k that are not among the
k known items (docs/quality.md's counting: new items only; users with none are skipped); the known
items are never recommended. Next to: global popularity (training-event counts, whole catalogue)
and the cold-start shard in its own order (no model). HR@10 etc. with 95% bootstrap intervals.

    python benchmarks/cold_start.py                     # ml-latest-small (../shared) and synthetic
    python benchmarks/cold_start.py --only synthetic --synthetic-users 3000
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO, add_data_set_options, data_sets  # noqa: E402
from benchmarks.report import append_report  # noqa: E402

TITLE = "Cold start (issue 13): users held out of training entirely"


def rows_of(ckpt, ids: np.ndarray) -> np.ndarray:
    """Item rows of global ids; ids the checkpoint never saw get distinct negative codes (a target
    nobody can rank, still counted)."""
    rows = ckpt.items.lookup(np.asarray(ids, np.int64), unknown=-1)
    missing = rows < 0
    rows[missing] = -2 - np.arange(int(missing.sum()))
    return rows


def user_requests(held, ckpt, known: int, following: int) -> list[dict]:
    """Per held-out user: the first `known` events (global ids, oldest first), the request time and the targets."""
    from sdk_builder.formats import BEHAVIOR_NAMES, Event

    order = np.lexsort((held.item, held.timestamp, held.user))
    held = held.take(order)
    starts = np.flatnonzero(np.r_[True, held.user[1:] != held.user[:-1]])
    ends = np.r_[starts[1:], len(held)]
    out = []
    for lo, hi in zip(starts.tolist(), ends.tolist()):
        if hi - lo <= known:
            continue
        seen = held.item[lo : lo + known]
        nxt = held.item[lo + known : min(hi, lo + known + following)]
        targets = np.unique(nxt[~np.isin(nxt, seen)])
        events = [Event(item_id=int(held.item[j]), category_id=int(held.category[j]),
                        behavior=BEHAVIOR_NAMES[int(held.behavior[j])], timestamp=int(held.timestamp[j]))
                  for j in range(lo, lo + known)]
        out.append({"user": int(held.user[lo]), "events": events, "request_time": int(held.timestamp[lo + known]),
                    "seen_rows": rows_of(ckpt, seen), "target_rows": rows_of(ckpt, targets)})
    return out


def evaluate(name: str, events, args) -> dict:
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.bundle import BundleBuilder
    from sdk_builder.bundle.coldstart import (
        build_cold_start, cold_start_ranked, cold_start_shard, hold_out_users, population_vector, with_user_row,
    )
    from sdk_builder.bundle.golden import EagerReference
    from sdk_builder.program import Shard
    from sdk_builder.shard import policy_prior
    from sdk_builder.client import Bundle
    from sdk_builder.data.dataset import prepare
    from sdk_builder.evaluation import bootstrap_interval, ranking_metrics, top_unseen
    from sdk_builder.formats import EventHistory
    from sdk_builder.runs import load_checkpoint, train_run

    started = time.perf_counter()
    kept, held = hold_out_users(events, args.held_out, seed=args.seed)
    data = prepare(kept, protocol="holdout", seed=args.seed)
    result: dict = {"data": name, "users": int(len(np.unique(events.user))), "held_out_users": int(len(np.unique(held.user)))}
    with tempfile.TemporaryDirectory(prefix="tbsm-coldstart-bench-") as tmp:
        # The default run (mean and zero rows), and one trained with user-id dropout (its unknown-user row).
        variants = {"default": (0.0, ("mean", "zero")), "dropout": (args.user_dropout, ("unknown",))}
        bundles, result["validation"] = {}, {}
        for variant, (dropout, populations) in variants.items():
            if variant == "dropout" and not dropout:
                continue
            run = Path(tmp) / variant
            metrics = train_run(data, run, TBSMConfig(**data.table_sizes()),
                                TrainConfig(epochs=args.epochs, seed=args.seed, user_dropout=dropout))
            result["validation"][variant] = metrics["ranking_validation"]
            builder = BundleBuilder(load_checkpoint(run), data, seed=args.seed, allow_weak_model=True)
            if variant == "default":
                default_builder = builder
            for p in populations:
                bundles[p] = Bundle(build_cold_start(builder, Path(tmp) / f"bundle-{p}", population=p).path)
        result["train_seconds"] = time.perf_counter() - started
        ckpt = builder.ckpt
        shard_ids = next(iter(bundles.values())).manifest.items.ids
        shard_rows = ckpt.items.lookup(np.asarray(shard_ids, np.int64))
        policy_order, _ = cold_start_ranked(builder.index, builder.policy.shard_size)
        popular = builder.index.popular
        # The blend weight of the prior: the bundles use the run's (chosen on personal shards);
        # the eager rows show what other weights would give (measured on these users: not a choice).
        base = default_builder.ckpt.model.eval()
        extended, population_row = with_user_row(base, population_vector(base, "mean"))
        extended_ckpt = copy.copy(ckpt)  # ShardView reads the population row from the checkpoint's model
        extended_ckpt.model = extended
        reference = EagerReference(extended, extended_ckpt)
        prior_rows, prior = policy_prior(policy_order)
        plain_shard = Shard(population_row, prior_rows, cold_start_shard(default_builder, population_row)[0].category_rows)
        result["tables"] = {}
        for k in (0, args.known):
            requests = [r for r in user_requests(held, ckpt, k, args.next) if len(r["target_rows"])]
            ranked: dict[str, list[np.ndarray]] = {"popularity": [], "shard_policy": []}
            ranked.update({f"bundle_{p}": [] for p in bundles})
            ranked.update({f"eager_w{w:g}": [] for w in args.weights})
            for r in requests:
                ranked["popularity"].append(top_unseen(-np.arange(len(popular), dtype=np.float64), popular, r["seen_rows"]))
                ranked["shard_policy"].append(top_unseen(-np.arange(len(policy_order), dtype=np.float64), policy_order,
                                                         r["seen_rows"]))
                history = EventHistory(user_id=None, events=r["events"])
                for p, bundle in bundles.items():
                    scores = bundle.score(history, r["request_time"], shard_ids)
                    ranked[f"bundle_{p}"].append(top_unseen(scores, shard_rows, r["seen_rows"]))
                [probability] = reference.scores_mixed([(plain_shard, history, r["request_time"], shard_ids)])
                logit = np.log(probability) - np.log1p(-probability)
                for w in args.weights:
                    ranked[f"eager_w{w:g}"].append(top_unseen(logit + w * prior, prior_rows, r["seen_rows"]))
            targets = [r["target_rows"] for r in requests]
            table = {}
            for row, lists in ranked.items():
                per_user = ranking_metrics(np.stack(lists), targets)
                table[row] = {m: {"mean": float(v.mean()), "ci95": list(bootstrap_interval(v, seed=args.seed))}
                              for m, v in per_user.items()}
            result["tables"][k] = {"users": len(requests), "targets": int(sum(len(t) for t in targets)),
                                   "shard_coverage": float(sum(np.isin(t, shard_rows).sum() for t in targets)
                                                           / max(sum(len(t) for t in targets), 1)),
                                   "rows": table}
    result["seconds"] = time.perf_counter() - started
    return result


ROW_NAMES = {
    "popularity": "global popularity, whole catalogue",
    "shard_policy": "cold-start shard in its own order (no model)",
    "bundle_mean": "cold-start bundle, mean user row (ExecuTorch)",
    "bundle_zero": "cold-start bundle, zero user row (ExecuTorch)",
    "bundle_unknown": "cold-start bundle, unknown-user row trained with user-id dropout (ExecuTorch)",
}


def format_tables(result: dict, args) -> str:
    from sdk_builder.evaluation import metrics_table

    parts = []
    for k, t in result["tables"].items():
        lines = [f"*{'no on-device history' if int(k) == 0 else f'first {k} events on the device'}*: {t['users']:,} users, "
                 f"{t['targets']:,} target items (next {args.next} events' new items), shard coverage "
                 f"{t['shard_coverage']:.3f}", "",
                 metrics_table(t["rows"], lambda row: ROW_NAMES.get(row)
                               or f"mean row, eager: logit + {row.removeprefix('eager_w')} x prior")]
        pop = t["rows"]["popularity"]["hr@10"]["mean"]
        verdicts = [f"{r.removeprefix('bundle_')} row: HR@10 {t['rows'][r]['hr@10']['mean'] - pop:+.3f} vs popularity"
                    for r in t["rows"] if r.startswith("bundle_")]
        eager = {r: t["rows"][r]["hr@10"]["mean"] - pop for r in t["rows"] if r.startswith("eager_w")}
        if eager:
            best = max(eager, key=eager.get)
            verdicts.append(f"best eager weight {best.removeprefix('eager_w')}: {eager[best]:+.3f}")
        lines += ["", "; ".join(verdicts) + "."]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_set_options(parser, synthetic_users=3000)
    parser.add_argument("--held-out", type=float, default=0.2, help="Fraction of users held out of training entirely.")
    parser.add_argument("--known", type=int, default=5, help="Events known on the device in case (ii).")
    parser.add_argument("--next", type=int, default=10, help="Events after the known ones whose new items are targets.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--weights", type=lambda text: [float(w) for w in text.split(",") if w], default=[0, 0.5, 1, 4],
                        help="Prior weights of the eager rows (comma-separated; empty: none).")
    parser.add_argument("--user-dropout", type=float, default=0.1,
                        help="Second run: this fraction of training samples on the unknown-user row (0: skip it).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-doc", action="store_true", help="Print only; write neither docs/benchmarks.md nor docs/coldstart-*.json.")
    args = parser.parse_args()

    import torch
    from executorch.extension.pybindings import portable_lib

    torch.set_num_threads(1)
    portable_lib._unsafe_reset_threadpool(1)
    sets = data_sets(args)
    entries = []
    for name, load in sets:
        result = evaluate(name, load(), args)
        if not args.no_doc:
            (REPO / "docs" / f"coldstart-{name}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
        v = "; ".join(f"{k} run {r['blended']:.4f} (prior weight {r['blend_weight']:g})" for k, r in result["validation"].items())
        pop = next(iter(result["validation"].values()))["popularity"]
        text = (f"**{name}**: {result['held_out_users']:,} of {result['users']:,} users held out of training; validation "
                f"HR@10 of the trained users' personal rankings: {v}, popularity {pop:.4f}; "
                f"{result['seconds']:.0f} s (training and building {result['train_seconds']:.0f} s).\n\n{format_tables(result, args)}")
        print(text, flush=True)
        entries.append(text)
    settings = (f"held out {args.held_out:.0%} of users (seed {args.seed}), {args.epochs} epoch(s), user-id dropout "
                f"{args.user_dropout:g} in the second run, k = {args.known} known "
                f"events, targets from the next {args.next}")
    if not args.no_doc:
        append_report(TITLE, settings, "\n\n".join(entries))


if __name__ == "__main__":
    main()
