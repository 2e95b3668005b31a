"""Model quality on MovieLens ml-latest-small in Taobao format: test AUC and stalled runs.

(a) Reference protocol, bench model (position feature), 1 epoch, `--seeds` seeds: test AUC
    mean/min/max for our defaults and for the reference's init and sampler side by side, next to
    the reference implementation's 0.639 and, per seed on the same test points, a "popularity +
    same genre as recent history" heuristic. Target: mean >= 0.70, every seed above the heuristic.
(b) Stalls (`--stall-seeds` seeds): runs whose best validation AUC stays below 0.55, on
    ml-latest-small (reference and holdout protocols) and on synthetic data. Target: 0.

Seed s is used for both data preparation and training. Data come from the repository-relative
../shared/data. Prints markdown tables and appends them to docs/benchmarks.md.

    python benchmarks/quality.py [--seeds 5] [--stall-seeds 20] [--skip-stalls]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ML_SMALL, REPO, append_to_doc, context_line, markdown_table  # noqa: E402

SECTION = "## Model quality (ml-latest-small)"
REFERENCE_MEAN, REFERENCE_RANGE, TARGET = 0.639, (0.596, 0.693), 0.70
OURS = {"init": "normal", "negatives": "uniform", "per_positive": 2, "lr": 0.2}  # tbsm-sdk train's defaults
REFERENCE = {"init": "reference", "negatives": "uniform", "per_positive": 1, "lr": 0.05}


def train(events, protocol: str, seed: int, variant: dict, *, bench: bool) -> tuple[dict, object]:
    from model.tbsm import TBSMConfig, taobao_bench_config
    from model.train import TrainConfig
    from sdk_builder.data.dataset import NegativeSampler, prepare
    from sdk_builder.runs import train_run

    data = prepare(events, protocol=protocol, seed=seed, sampler=NegativeSampler(variant["negatives"], variant["per_positive"]))
    make = taobao_bench_config if bench else TBSMConfig
    cfg = make(**data.table_sizes(), init=variant["init"])
    with tempfile.TemporaryDirectory(prefix="tbsm-quality-") as out:
        # AUC is what this benchmark reports, so the checkpoint is chosen by validation AUC.
        metrics = train_run(data, Path(out), cfg, TrainConfig(epochs=1, seed=seed, lr=variant["lr"], select_by="val_auc"))
    return metrics, data


def heuristic_auc(data) -> float:
    """Popularity percentile of the candidate + the share of the user's last 20 events in its genre."""
    from model.metrics import roc_auc

    test = data.splits["test"]
    counts = np.bincount(data.item_rows[data.training_event_mask()], minlength=data.items.rows)
    percentile = np.argsort(np.argsort(counts, kind="stable"), kind="stable") / len(counts)
    items = np.where(test.negative_item >= 0, test.negative_item, data.item_rows[test.candidate])
    cats = data.item_category[items]
    offsets = np.arange(-20, 0)
    idx = test.candidate[:, None] + offsets
    valid = idx >= data.user_start[test.user][:, None]
    same = (data.cat_rows[np.where(valid, idx, 0)] == cats[:, None]) & valid
    share = same.sum(1) / np.maximum(valid.sum(1), 1)
    return roc_auc(test.label, percentile[items] + share)


def auc_table(events, seeds: list[int]) -> tuple[str, str]:
    rows, per_seed = [], {}
    for name, variant in (("ours", OURS), ("reference init, lr 0.05", REFERENCE)):
        aucs, heur = [], []
        for seed in seeds:
            metrics, data = train(events, "reference", seed, variant, bench=True)
            aucs.append(metrics["test"]["auc"])
            heur.append(heuristic_auc(data))
            print(f"  {name} seed {seed}: test AUC {aucs[-1]:.4f}, heuristic {heur[-1]:.4f} "
                  f"({metrics['test']['points']} points)", file=sys.stderr, flush=True)
        per_seed[name] = (aucs, heur)
        above = sum(a > h for a, h in zip(aucs, heur))
        rows.append([name, str(len(seeds)), f"{statistics.mean(aucs):.3f}", f"{min(aucs):.3f}", f"{max(aucs):.3f}",
                     " ".join(f"{a:.3f}" for a in aucs), f"{statistics.mean(heur):.3f}", f"{above}/{len(seeds)}"])
    rows.append(["reference implementation (TBSM repo)", "5", f"{REFERENCE_MEAN:.3f}", f"{REFERENCE_RANGE[0]:.3f}",
                 f"{REFERENCE_RANGE[1]:.3f}", "-", "-", "-"])
    table = markdown_table(["run", "seeds", "test AUC mean", "min", "max", "per seed", "heuristic mean",
                            "seeds above heuristic"], rows, align="-rrrr-rr")
    aucs, heur = per_seed["ours"]
    mean = statistics.mean(aucs)
    verdict = (f"Ours: mean {mean:.3f} (target >= {TARGET}: {'met' if mean >= TARGET else 'NOT met'}); "
               f"seeds above the heuristic {sum(a > h for a, h in zip(aucs, heur))}/{len(seeds)} "
               f"(target all: {'met' if all(a > h for a, h in zip(aucs, heur)) else 'NOT met'}).")
    return table, verdict


def stall_table(ml_events, synthetic_events, seeds: list[int]) -> tuple[str, str]:
    from sdk_builder.runs import STALLED_AUC

    settings = [("ml-latest-small, reference protocol, bench config", ml_events, "reference", True),
                ("ml-latest-small, holdout protocol, default config", ml_events, "holdout", False),
                ("synthetic (2,000 users), holdout protocol, default config", synthetic_events, "holdout", False)]
    rows, stalls_ours = [], 0
    for label, events, protocol, bench in settings:
        if events is None:
            continue
        variants = (("ours", OURS), ("reference init, lr 0.05", REFERENCE)) if protocol == "reference" else (("ours", OURS),)
        for name, variant in variants:
            best = []
            for seed in seeds:
                metrics, _ = train(events, protocol, seed, variant, bench=bench)
                best.append(max(h["val_auc"] for h in metrics["history"]))
            stalled = sum(b < STALLED_AUC for b in best)
            stalls_ours += stalled if name == "ours" else 0
            rows.append([label, name, f"{stalled}/{len(seeds)}", f"{min(best):.3f}", f"{statistics.median(best):.3f}"])
            print(f"  {label}, {name}: {stalled}/{len(seeds)} stalled", file=sys.stderr, flush=True)
    table = markdown_table(["data and protocol", "init and negatives", "stalled runs", "lowest best val AUC",
                            "median best val AUC"], rows, align="--rrr")
    return table, f"Stalled runs (best validation AUC < {STALLED_AUC}) with our defaults: {stalls_ours} (target 0)."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ML_SMALL)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--stall-seeds", type=int, default=20)
    parser.add_argument("--skip-stalls", action="store_true")
    parser.add_argument("--skip-auc", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from sdk_builder.data.events import read_taobao_csv
    from sdk_builder.data.synthetic import generate_taobao_events

    torch.set_num_threads(args.threads)
    ctx = context_line("benchmarks/quality.py " + " ".join(sys.argv[1:]))
    ml_events = read_taobao_csv(args.data)[0] if args.data.is_file() else None
    if ml_events is None:
        print(f"{args.data}: not found; the AUC part and the ml-latest-small stall rows are skipped", file=sys.stderr)
    started = time.perf_counter()
    parts = []
    if ml_events is not None and not args.skip_auc:
        table, verdict = auc_table(ml_events, list(range(args.seeds)))
        parts.append(f"Reference protocol, bench config, 1 epoch; ours = init {OURS['init']}, negatives "
                     f"{OURS['negatives']} x{OURS['per_positive']}, lr {OURS['lr']}; checkpoint by validation AUC."
                     f"\n\n{table}\n\n{verdict}")
    if not args.skip_stalls:
        synthetic = generate_taobao_events(2000, seed=0)
        table, verdict = stall_table(ml_events, synthetic, list(range(args.stall_seeds)))
        parts.append(f"Stalls over {args.stall_seeds} seeds, 1 epoch each.\n\n{table}\n\n{verdict}")
    text = "\n\n".join(parts) + f"\n\nTotal time {time.perf_counter() - started:.0f} s."
    print(text)
    append_to_doc(SECTION, f"{ctx}.\n\n{text}")
    print(f"\nappended to {REPO / 'docs' / 'benchmarks.md'}")


if __name__ == "__main__":
    main()
