"""On-device recommendation quality: each test user's real bundle ranking its shard in ExecuTorch.

Per data set: hold each user's last K events out of everything (`--holdout-last`), train the
default model, then `evaluate_on_device` with real stamped fp32 and int8 bundles next to global
popularity, the shard in popularity and in policy order, and the full model over the whole
catalogue. Prints the table with 95% bootstrap intervals, writes JSON and a PNG bar chart beside
docs/benchmarks.md and appends the table there.

    python benchmarks/on_device.py                      # ml-latest-small (../shared) and synthetic
    python benchmarks/on_device.py --only synthetic --synthetic-users 20000 --max-users 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, add_data_set_options, append_to_doc, context_line, data_sets  # noqa: E402

SECTION = "## On-device ranking quality (held-out last events)"
TARGETS = {"vs_popularity": 1.5, "vs_shard_policy": 1.0, "vs_server": 0.95}
INT8_TOLERANCE = 0.005


def run_one(name: str, events, args) -> dict:
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.data.dataset import NegativeSampler, prepare
    from sdk_builder.evaluation import evaluate_on_device, format_table, plot_report, prior_weight, ratios
    from sdk_builder.ondevice import BundleRanker
    from sdk_builder.runs import load_checkpoint, train_run

    started = time.perf_counter()
    data = prepare(events, protocol="holdout", seed=args.seed, holdout_last=args.holdout_last,
                   sampler=NegativeSampler(args.negatives, args.negatives_per_positive))
    with tempfile.TemporaryDirectory(prefix="tbsm-ondevice-bench-") as out:
        metrics = train_run(data, Path(out), TBSMConfig(**data.table_sizes(), init=args.init),
                            TrainConfig(epochs=args.epochs, seed=args.seed, lr=args.lr, select_by=args.select_by))
        ckpt = load_checkpoint(Path(out))
        train_seconds = time.perf_counter() - started
        ranker = BundleRanker(ckpt, data, seed=args.seed)
        report = evaluate_on_device(ckpt.model, data, max_users=args.max_users, seed=args.seed, bundle_ranker=ranker,
                                    blend_weight=prior_weight(ckpt.payload))
    result = {"data": name, "train_seconds": train_seconds, "validation": metrics["ranking_validation"],
              "warnings": metrics["warnings"], "test_auc": (metrics["test"] or {}).get("auc"), **report.summary(),
              "ratios_hr@10": ratios(report), "int8_fallbacks": ranker.fallbacks.get("int8")}
    table = format_table(report)
    png = REPO / "docs" / f"ondevice-{name}.png"
    plot_report(report, png, f"{name}: on-device ranking of each user's held-out last {args.holdout_last} events, "
                             f"{report.users:,} users")
    (REPO / "docs" / f"ondevice-{name}.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    return {"result": result, "table": table, "png": png}


def verdict(result: dict) -> str:
    r = result["ratios_hr@10"]
    parts = []
    for key, target in TARGETS.items():
        if key in r:
            parts.append(f"{key.replace('_', ' ')} {r[key]:.2f}x (target >= {target}x: {'met' if r[key] >= target else 'NOT met'})")
    if "int8_minus_fp32" in r:
        d = r["int8_minus_fp32"]
        parts.append(f"int8 - fp32 HR@10 {d:+.4f} (target within {INT8_TOLERANCE}: {'met' if abs(d) <= INT8_TOLERANCE else 'NOT met'})")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_set_options(parser, synthetic_users=20_000)
    parser.add_argument("--max-users", type=int, default=2000, help="Seeded sample of test users per data set.")
    parser.add_argument("--holdout-last", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--init", default="normal")
    parser.add_argument("--negatives", default="uniform")
    parser.add_argument("--negatives-per-positive", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--select-by", default="val_hr10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    ctx = context_line("benchmarks/on_device.py " + " ".join(sys.argv[1:]))
    sets = data_sets(args)
    entries = []
    for name, load in sets:
        out = run_one(name, load(), args)
        r = out["result"]
        text = (f"**{name}**: {r['users']:,} test users ({r['skipped_no_target']:,} with no new held-out item skipped), "
                f"{r['targets']:,} held-out items, shard coverage {r['shard_coverage']:.3f}; validation HR@10 "
                f"{r['validation']['blended']:.4f} (model alone {r['validation']['model_alone']:.4f}, prior weight "
                f"{r['validation']['blend_weight']:g}) vs popularity {r['validation']['popularity']:.4f}; int8 fp32 fallbacks "
                f"{r['int8_fallbacks']}; seconds {', '.join(f'{k} {v:.0f}' for k, v in r['seconds'].items())}, "
                f"training {r['train_seconds']:.0f}.\n\n{out['table']}\n\n{verdict(r)}. Chart: `docs/{out['png'].name}`.")
        print(text, flush=True)
        entries.append(text)
    settings = (f"holdout last {args.holdout_last}, {args.epochs} epoch(s), init {args.init}, lr {args.lr}, negatives {args.negatives} "
                f"x{args.negatives_per_positive}, checkpoint by {args.select_by}, seed {args.seed}, <= {args.max_users} users")
    append_to_doc(SECTION, f"{ctx}; {settings}.\n\n" + "\n\n".join(entries))


if __name__ == "__main__":
    main()
