"""Model quality on MovieLens ml-latest-small in Taobao format, 5 seeds per configuration.

(a) the reference protocol with the bench model (position feature), 1 epoch: test AUC mean/min/max
    next to the reference implementation's 0.639 mean (0.596-0.693), target >= 0.70;
(b) the holdout protocol, 1 epoch, time feature vs position feature.

Seed s is used for both data preparation and training. Runs use the library (prepare + train_run)
into temporary directories. Prints a markdown table and appends it to docs/benchmarks.md.

    python benchmarks/quality.py [--data PATH] [--seeds 5] [--epochs 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, append_to_doc, context_line, markdown_table  # noqa: E402

SECTION = "## Model quality (ml-latest-small)"
DEFAULT_DATA = Path("/work/shared/data/ml-latest-small/UserBehavior.csv")
REFERENCE_MEAN, REFERENCE_RANGE, TARGET = 0.639, (0.596, 0.693), 0.70


def run(events, protocol: str, dense_feature: str, seed: int, epochs: int) -> dict:
    from model.tbsm import taobao_bench_config
    from model.train import TrainConfig
    from sdk_builder.data.dataset import prepare
    from sdk_builder.runs import train_run

    data = prepare(events, protocol=protocol, seed=seed)
    cfg = taobao_bench_config(**data.table_sizes(), dense_feature=dense_feature)
    with tempfile.TemporaryDirectory(prefix="tbsm-quality-") as out:
        m = train_run(data, Path(out), cfg, TrainConfig(epochs=epochs, seed=seed))
    return {"test_auc": m["test"]["auc"], "points": m["test"]["points"], "val_auc": m["best_validation_auc"],
            "train": data.info["split_sizes"]["train"], "info": data.info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"{args.data}: not found; nothing to benchmark (pass --data PATH to a Taobao-format CSV)")
        return

    import torch

    from sdk_builder.data.events import read_taobao_csv

    torch.set_num_threads(args.threads)
    ctx = context_line("benchmarks/quality.py " + " ".join(sys.argv[1:]))
    events, report = read_taobao_csv(args.data)
    seeds = list(range(args.seeds))
    configs = [("reference", "position"), ("holdout", "time"), ("holdout", "position")]
    results: dict[tuple[str, str], list[dict]] = {}
    started = time.perf_counter()
    for protocol, feature in configs:
        results[protocol, feature] = []
        for seed in seeds:
            r = run(events, protocol, feature, seed, args.epochs)
            results[protocol, feature].append(r)
            print(f"  {protocol:9s} {feature:8s} seed {seed}: test AUC {r['test_auc']:.4f} on {r['points']} points "
                  f"(validation {r['val_auc']:.4f}, {r['train']:,} training samples)", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    rows = []
    for protocol, feature in configs:
        rs = results[protocol, feature]
        aucs = [r["test_auc"] for r in rs]
        points = sorted({r["points"] for r in rs})
        rows.append([protocol, "bench (position)" if feature == "position" else "bench, time feature",
                     str(args.epochs), str(len(rs)), f"{statistics.mean(aucs):.3f}", f"{min(aucs):.3f}",
                     f"{max(aucs):.3f}", f"{statistics.stdev(aucs):.3f}" if len(aucs) > 1 else "-",
                     "/".join(map(str, points)),
                     f"{statistics.mean(r['val_auc'] for r in rs):.3f}",
                     f"{statistics.mean(r['train'] for r in rs):,.0f}"])
    rows.append(["reference (TBSM repo)", "bench (position)", "1", "5", f"{REFERENCE_MEAN:.3f}",
                 f"{REFERENCE_RANGE[0]:.3f}", f"{REFERENCE_RANGE[1]:.3f}", "-", "182", "-", "-"])
    table = markdown_table(["protocol", "model", "epochs", "seeds", "test AUC mean", "min", "max", "std",
                            "test points", "val AUC mean", "train samples"], rows, align="--rrrrrrrrr")
    ref = results["reference", "position"]
    ref_mean = statistics.mean(r["test_auc"] for r in ref)
    info = ref[0]["info"]
    verdict = (f"Reference protocol, bench config: mean test AUC {ref_mean:.3f} vs the reference's "
               f"{REFERENCE_MEAN:.3f}; target >= {TARGET:.2f} {'met' if ref_mean >= TARGET else 'NOT met'}. "
               f"Reference protocol users (seed 0): {info['train_users']} train, {info['validation_users']} "
               f"validation, {info['test_users']} test. With ~180-600 test points one run has roughly +-0.03-0.04 "
               f"of sampling noise. Total time {elapsed:.0f} s.")
    note = (f"{args.data.name}: {report.rows_kept:,} events, {len(set(events.user.tolist())):,} users; "
            f"seed s for data preparation and training; Adagrad lr 0.05, batch 256; test AUC of the "
            f"best-validation checkpoint")
    print(table)
    print()
    print(verdict)
    append_to_doc(SECTION, f"{ctx}. {note}.\n\n{table}\n\n{verdict}")
    print(f"\nappended to {REPO / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
