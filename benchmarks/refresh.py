"""On-device refresh (issue 13 item 2): does a user state refreshed on the phone recover what a
server rebuild with the newest events gains?

Per data set: hold each user's last `--stream` + `--next-events` events out of everything, train
the default model on the rest, then for a seeded sample of users rank the next events' new items
with real bundles in the ExecuTorch runtime, from the same on-device history (the streamed
events): (a) the frozen bundle built before the stream, (b) that bundle with its user state
refreshed on the phone as the stream arrives, (c) the bundle rebuilt on the server with the
stream and the same checkpoint, and (c') that rebuild made from (a) as `build --delta-from` makes it
(hysteresis: the ranking cost of small patches). Prints the table with 95% bootstrap intervals, the share of the
(a) -> (c) HR@10 gap (b) recovers and the share no state of (a) can reach (targets outside (a)'s
shard), and appends them to docs/benchmarks.md.

    python benchmarks/refresh.py                                  # ml-latest-small (../shared) and synthetic
    python benchmarks/refresh.py --only synthetic --synthetic-users 3000 --max-users 300
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_data_set_options, data_sets  # noqa: E402
from benchmarks.report import append_report  # noqa: E402

TITLE = "On-device refresh: frozen vs refreshed vs rebuilt bundle (issue 13)"
TARGET_RECOVERED = 0.5


def run_one(name: str, events, args) -> str:
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.data.dataset import NegativeSampler
    from sdk_builder.evaluation import format_stream_table, stream_split
    from sdk_builder.ondevice import evaluate_stream
    from sdk_builder.runs import load_checkpoint, train_run

    started = time.perf_counter()
    split = stream_split(events, stream=args.stream, next_events=args.next_events, protocol="holdout", seed=args.seed,
                         sampler=NegativeSampler(args.negatives, args.negatives_per_positive))
    with tempfile.TemporaryDirectory(prefix="tbsm-refresh-bench-") as out:
        metrics = train_run(split.data, Path(out), TBSMConfig(**split.data.table_sizes()),
                            TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr))
        ckpt = load_checkpoint(Path(out))
        trained = time.perf_counter()
        report = evaluate_stream(ckpt, split, max_users=args.max_users, seed=args.seed)
    seconds = f"training {trained - started:.0f} s, bundles and ranking {time.perf_counter() - trained:.0f} s"
    gap = report.gap
    lines = [f"**{name}**: {report.users:,} users ({report.skipped_no_target:,} with no new item in the next "
             f"{args.next_events} events skipped), {report.targets:,} target items; target coverage of the frozen shard "
             f"{report.coverage['frozen']:.3f}, of the rebuilt shard {report.coverage['rebuilt']:.3f}; validation HR@10 "
             f"{metrics['ranking_validation']['blended']:.4f} (prior weight {metrics['ranking_validation']['blend_weight']:g}); "
             f"{seconds}.", "", format_stream_table(report), ""]
    def points(key: str) -> str:
        lo, hi = gap[f"{key}_ci95"]
        return f"{gap[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    if "a_to_c" in gap:
        share = gap["outside_frozen_shard"] / gap["a_to_c"] if gap["a_to_c"] > 0 else float("nan")
        lines.append(f"HR@10 gap (a) -> (c): {points('a_to_c')} (paired over users); of it, hits only on targets "
                     f"outside (a)'s shard, which no refreshed state of (a) can rank: {points('outside_frozen_shard')} "
                     f"({share:.0%} of the gap).")
    if "recovered_by_refresh" in gap:
        r, (lo, hi) = gap["recovered_by_refresh"], gap["recovered_by_refresh_ci95"]
        met = "met" if r >= TARGET_RECOVERED else "NOT met"
        lines.append(f"(b) - (a): {points('refresh_gain')}; share of the gap recovered by the on-device refresh: {r:.2f} "
                     f"[{lo:.2f}, {hi:.2f}] (target >= {TARGET_RECOVERED}: {met}; the interval is n/a when some resample "
                     "has no positive gap).")
    else:
        lines.append("(b) not measured: the bundles have no refresh program.")
    if "delta_cost" in gap:
        lines.append(f"(c') - (c): {points('delta_cost')}: what rebuilding from (a) as `build --delta-from` does (shard "
                     "and co-visit lists kept within the slack, for small patches) costs vs rebuilding afresh.")
    if "phone_order_gain" in gap:
        lines.append(f"No model: (a)'s shard in the policy order recomputed from the phone's events minus its build-time "
                     f"order: {points('phone_order_gain')} (what a prior computed on the phone instead of stamped could add).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_set_options(parser, synthetic_users=3000)
    parser.add_argument("--max-users", type=int, default=300, help="Seeded sample of evaluated users per data set.")
    parser.add_argument("--stream", type=int, default=20, help="Events streamed to the phone after the bundle was built.")
    parser.add_argument("--next-events", type=int, default=10, help="Events after the stream whose new items are the targets.")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--negatives", default="uniform")
    parser.add_argument("--negatives-per-positive", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sets = data_sets(args)
    entries = []
    for name, load in sets:
        text = run_one(name, load(), args)
        print(text + "\n", flush=True)
        entries.append(text)
    settings = (f"stream {args.stream} events, targets the new items of the next {args.next_events}, {args.epochs} epoch(s), "
                f"lr {args.lr}, negatives {args.negatives} x{args.negatives_per_positive}, seed {args.seed}, "
                f"<= {args.max_users} users, fp32 (xnnpack) bundles in the ExecuTorch runtime")
    append_report(TITLE, settings, "\n\n".join(entries))


if __name__ == "__main__":
    main()
