"""Patch size: how many bytes a CDN ships when a user's bundle is rebuilt after one more day of events.

For each data set: train (1 epoch, seed 0) on the events before the cut, build --users bundles
(fp32 = xnnpack, and int8) from that, extend the run's data with the next day's events
(`extend_events`, same checkpoint), build the same users again, and for each user write the patch
old -> new (`sdk_builder.bundle.delta`), apply it and compare with the fresh build byte for byte.
The rebuild runs once with the shard selected afresh and once per --slacks value with shard
hysteresis (the old bundle's items kept within the slack, as `build --delta-from` does); the
quality cost is the shard coverage of the newer events with and without it.

- ml-latest-small (../shared/data): at most 7 of its 610 users rated anything on any one calendar
  day, so the "next day" is per user: each user's last active day (UTC) is held back and arrives as
  the newer events. Every user is rebuilt after one more day of their own events.
- synthetic (9 days of Taobao-format events): one global cut, the first 8 days, then day 9; users
  with and without events on day 9 are reported apart.

Prints a markdown table and appends it to docs/benchmarks.md (target: median patch <= 10% of the
full bundle for users with new events; 100% of patched bundles byte-identical to fresh builds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import ML_SMALL, markdown_table  # noqa: E402
from benchmarks.report import append_report  # noqa: E402
from sdk_builder.shard import DEFAULT_SLACK  # noqa: E402

DAY = 86_400
RECIPES = {"fp32": "xnnpack", "int8": "int8"}


def ml_split(events):
    """(older, newer): each user's last active UTC day is the newer events."""
    day = events.timestamp // DAY
    last_day = np.zeros(len(events), np.int64)
    starts = np.flatnonzero(np.r_[True, events.user[1:] != events.user[:-1]])  # sorted by (user, time)
    ends = np.r_[starts[1:], len(events)]
    for s, e in zip(starts, ends):
        last_day[s:e] = day[e - 1]
    newer = day == last_day
    # Users whose every event is on their last day would have no row: keep them whole in the older part.
    only_last = np.repeat(np.add.reduceat(~newer, starts) == 0, ends - starts)
    newer &= ~only_last
    return events.take(~newer), events.take(newer)


def synthetic_split(events):
    cut = int(events.timestamp.min()) // DAY * DAY + 8 * DAY
    return events.take(events.timestamp < cut), events.take((events.timestamp >= cut) & (events.timestamp < cut + DAY))


def previous_day_mask(data, target: np.ndarray) -> np.ndarray:
    """Events before each user's last active UTC day outside `target`: the user's shard a day earlier."""
    day = data.timestamps // DAY
    user = data.user_of_event()
    last_older_day = np.full(len(data.users.ids), np.iinfo(np.int64).min)
    np.maximum.at(last_older_day, user[~target], day[~target])
    return ~target & (day < last_older_day[user])


def measure(name: str, older, newer, n_users: int, slacks: list[float], recipes: dict[str, str], tmp: Path) -> tuple[list[list[str]], list[list[str]]]:
    import torch
    from executorch.extension.pybindings import portable_lib

    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.bundle.delta import PreviousBundles, apply_patch, bundle_files, make_patch
    from sdk_builder.data.dataset import PreparedData, extend_events, prepare
    from sdk_builder.formats import MANIFEST, decode_ids
    from sdk_builder.runs import DATA, load_checkpoint, train_run
    from sdk_builder.shard import ShardPolicy, hysteresis_coverage

    torch.set_num_threads(1)
    portable_lib._unsafe_reset_threadpool(1)
    run = tmp / name / "run"
    data = prepare(older, protocol="holdout", seed=0)
    train_run(data, run, TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=0))
    ckpt, data = load_checkpoint(run), PreparedData.load(run / DATA)
    extended, counts = extend_events(data, newer)
    print(f"{name}: newer events {counts}", file=sys.stderr)
    active = set(np.unique(newer.user).tolist())
    ids = [int(u) for u in ckpt.users.ids]
    rng = np.random.default_rng(0)
    users = sorted(int(u) for u in rng.choice(ids, size=min(n_users, len(ids)), replace=False))

    # Coverage: the shard cut before the user's last older day (previous), then after it with each
    # slack (0: no hysteresis); targets are the newer events. Every user with newer events.
    old_count = np.diff(data.user_start)
    user_of_event = extended.user_of_event()
    position = np.arange(extended.num_events) - extended.user_start[user_of_event]
    target = position >= old_count[user_of_event]
    coverage = hysteresis_coverage(extended, ShardPolicy(), previous_day_mask(extended, target), ~target, target,
                                   (0.0, *slacks))
    coverage_rows = [[name, "none" if slack == 0 else f"{slack:g}", f"{c['users']:,}", f"{c['target_events']:,}",
                      f"{c['coverage']:.4f}", f"{c['coverage'] - coverage[0.0]['coverage']:+.4f}", f"{c['new_items']:.1f}"]
                     for slack, c in coverage.items()]
    for row in coverage_rows:
        print("| " + " | ".join(row) + " |", file=sys.stderr)

    rows = []
    for label, recipe in recipes.items():
        started = time.perf_counter()
        old_builder = BundleBuilder(ckpt, data, ShardPolicy(), recipe=recipe, allow_weak_model=True,
                                    on_budget_exceeded="fp32")
        old_builder.prepare_stamping()
        old_out = tmp / name / recipe / "old"
        olds = {r.user_id: r.path for r in old_builder.build_many(users, old_out)}
        for slack in [0.0, *slacks]:
            # slack 0: the shard selected afresh, as without a previous bundle
            new_builder = BundleBuilder(ckpt, extended, ShardPolicy(), recipe=recipe, allow_weak_model=True,
                                        on_budget_exceeded="fp32", previous=PreviousBundles(root=old_out),
                                        shard_slack=slack)
            new_builder.template = old_builder.template  # same checkpoint, recipe and layout: the same program
            new_out = tmp / name / recipe / f"new-{slack:g}"
            news = {r.user_id: r.path for r in new_builder.build_many(users, new_out)}
            stats = {True: [], False: []}  # has newer events -> [(patch bytes, full bytes, identical, unchanged, new items)]
            for user in users:
                old_files, new_files = bundle_files(olds[user]), bundle_files(news[user])
                patch = make_patch(olds[user], news[user])
                identical = apply_patch(old_files, patch, "patch") == new_files
                shard_before, shard_after = (set(decode_ids(json.loads(f[MANIFEST])["items"]["ids"])) for f in (old_files, new_files))
                stats[user in active].append((len(patch), sum(map(len, new_files.values())), identical,
                                              old_files == new_files, len(shard_after - shard_before)))
            for has_events, group in ((True, stats[True]), (False, stats[False])):
                if not group:
                    continue
                patch_bytes, full = np.array([g[0] for g in group]), np.array([g[1] for g in group])
                rows.append([name, label, "none" if slack == 0 else f"{slack:g}", "yes" if has_events else "no",
                             f"{len(group):,}", f"{np.median(patch_bytes):,.0f}", f"{np.percentile(patch_bytes, 90):,.0f}",
                             f"{np.median(full):,.0f}", f"{np.median(patch_bytes / full):.1%}",
                             f"{np.percentile(patch_bytes / full, 90):.1%}",
                             f"{np.median([g[4] for g in group]):,.0f}",
                             f"{sum(g[2] for g in group) / len(group):.0%}", f"{sum(g[3] for g in group):,}"])
                print("| " + " | ".join(rows[-1]) + " |", file=sys.stderr)
        print(f"{name} {label}: {len(users)} users x {1 + len(slacks)} rebuilds in {time.perf_counter() - started:.0f} s",
              file=sys.stderr)
    return rows, coverage_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=300, help="Users per data set.")
    parser.add_argument("--synthetic-users", type=int, default=1000)
    parser.add_argument("--slacks", default=str(DEFAULT_SLACK),
                        help="Comma-separated shard hysteresis slacks to compare with none (sdk_builder/shard.py).")
    parser.add_argument("--only", choices=["ml-latest-small", "synthetic"], help="One data set.")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="Comma-separated subset of fp32,int8.")
    parser.add_argument("--no-report", action="store_true", help="Print only; do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    slacks = [float(x) for x in args.slacks.split(",") if float(x) > 0]
    recipes = {label: RECIPES[label] for label in args.recipes.split(",")}

    from sdk_builder.data.events import read_taobao_csv
    from sdk_builder.data.synthetic import generate_taobao_events

    tmp = Path(tempfile.mkdtemp(prefix="tbsm-delta-bench-"))
    rows, coverage_rows = [], []
    if args.only != "synthetic":
        if ML_SMALL.exists():
            r, c = measure("ml-latest-small", *ml_split(read_taobao_csv(ML_SMALL)[0]), args.users, slacks, recipes, tmp)
            rows, coverage_rows = rows + r, coverage_rows + c
        else:
            print(f"{ML_SMALL} is absent: synthetic data only", file=sys.stderr)
    if args.only != "ml-latest-small":
        synthetic = generate_taobao_events(args.synthetic_users, n_items=20_000, n_categories=200, seed=0)
        r, c = measure("synthetic", *synthetic_split(synthetic), args.users, slacks, recipes, tmp)
        rows, coverage_rows = rows + r, coverage_rows + c
    table = markdown_table(
        ["data", "recipe", "shard slack", "new events", "users", "median patch (B)", "p90 patch (B)",
         "median bundle (B)", "median patch / bundle", "p90 patch / bundle", "median items new to the shard",
         "patched = fresh build", "bundles unchanged"],
        rows, "llllrrrrrrrrr")
    coverage_table = markdown_table(
        ["data", "shard slack", "users with newer events", "newer events", "coverage of the newer events",
         "vs no hysteresis", "mean items new to the shard"], coverage_rows, "llrrrrr")
    table = f"{table}\n\nQuality cost (shard coverage of the newer events; the previous shard is cut before each " \
            f"user's last older active day, all users with newer events):\n\n{coverage_table}"
    print(table)
    if not args.no_report:
        append_report("Delta updates: patch bytes after one more day of events",
                      f"{args.users} users per data set; patch = `build --delta-from` (copy/insert ops, raw DEFLATE); "
                      "ml-latest-small: each user's last active day arrives as the newer events, synthetic: day 9 "
                      "of 9 after a cut at day 8; one checkpoint per data set, trained before the cut; shard slack: "
                      "the rebuild keeps the old bundle's items within it (sdk_builder/shard.py, none: selected afresh)",
                      table)


if __name__ == "__main__":
    main()
