"""Bundle size and score drift of each recipe (xnnpack, fp16, int8) over many users, in one run (issue 12).

For --users users of a run (default: a fresh 1-epoch ml-latest-small run; `--run runs/demo/run`
for the demo's), builds every user's bundle with each recipe (one stamped template per recipe,
the accuracy budget checked per user, fp32 fallbacks counted) and reports per recipe: whole-bundle
and model.pte bytes (median / max), the build-time score drift vs the fp32 model (median / max),
and the golden replay's max |runtime - eager| over the bundles that replayed.
Prints a markdown table and appends it to docs/benchmarks.md (benchmarks/report.py).

    python benchmarks/recipes.py [--run RUN] [--users 300] [--no-report]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import one_thread_run  # noqa: E402
from benchmarks.report import append_report  # noqa: E402

RECIPES = ("xnnpack", "fp16", "int8")
FP32_TARGET, INT8_TARGET = 140 * 1024, 48 * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained run directory (default: train on ml-latest-small).")
    parser.add_argument("--users", type=int, default=300, help="Seeded sample of the run's users (0: all).")
    parser.add_argument("--no-report", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    tmp, ckpt, data = one_thread_run(args.run, "tbsm-recipes-bench-")

    from sdk_builder.bundle.build import BundleBuilder
    from sdk_builder.client import read_manifest
    from sdk_builder.shard import ShardPolicy

    ids = np.asarray(ckpt.users.ids)
    n = len(ids) if args.users <= 0 else min(args.users, len(ids))
    user_ids = [int(u) for u in np.sort(np.random.default_rng(0).choice(ids, n, replace=False))]
    rows = ["| recipe | bundles | fp32 fallbacks | bundle B, median / max | model.pte B, median / max | "
            "drift vs fp32, median / max | golden replay max diff |", "|---|---:|---:|---|---|---|---|"]
    for recipe in RECIPES:
        builder = BundleBuilder(ckpt, data, ShardPolicy(), recipe=recipe, on_budget_exceeded="fp32", allow_weak_model=True)
        builder.prepare_stamping()
        results = [builder.build(u, tmp / recipe) for u in user_ids]
        total = [r.bytes_total for r in results]
        program = [r.bytes_program for r in results]
        fallbacks = sum(r.recipe != recipe for r in results)
        drifts = [q.max_score_drift for r in results if (q := read_manifest(r.path).quantization) is not None]
        diffs = [r.max_golden_diff for r in results if not math.isnan(r.max_golden_diff)]
        drift = f"{np.median(drifts):.1e} / {max(drifts):.1e}" if drifts else "0 (exact)"
        replay = f"{max(diffs):.1e} over {len(diffs)}" if diffs else "-"
        rows.append(f"| {recipe} | {len(results)} | {fallbacks} | {int(np.median(total)):,} / {max(total):,} | "
                    f"{int(np.median(program)):,} / {max(program):,} | {drift} | {replay} |")
    text = "\n".join(rows)
    print(text)
    if not args.no_report:
        source = args.run or "ml-latest-small, holdout, 1 epoch, seed 0"
        append_report("Bundle size and drift by recipe (issue 12)",
                      f"data: {source}; {n} users; targets: fp32 bundle <= {FP32_TARGET:,} B, int8 <= {INT8_TARGET:,} B",
                      text)


if __name__ == "__main__":
    main()
