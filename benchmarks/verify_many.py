"""`tbsm-sdk verify` of many bundles in one call, against one process per bundle.

Trains a tiny model on synthetic data (--users users), builds every user's bundle with
`tbsm-sdk build --all` (small shards), then times in one run:
- `tbsm-sdk verify --index bundles.jsonl --json` over all of them (one process: the runtime loads
  once), wall seconds including start-up;
- `tbsm-sdk verify BUNDLE`, one process per bundle, for --sample bundles, extrapolated to all.
Prints a markdown table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import markdown_table  # noqa: E402
from benchmarks.report import append_report  # noqa: E402

CLI = [sys.executable, "-m", "sdk_builder.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def tiny_run(run: Path, users: int) -> Path:
    """A one-epoch model on synthetic events of `users` users (small tables: quality is irrelevant)."""
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.data.dataset import prepare
    from sdk_builder.data.synthetic import generate_taobao_events
    from sdk_builder.runs import CHECKPOINT, train_run

    if (run / CHECKPOINT).exists():
        return run
    data = prepare(generate_taobao_events(users, n_items=3000, n_categories=40, seed=3), seed=3)
    train_run(data, run, TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=3))
    return run


def build_all(run: Path, out: Path, users: int | None = None, shard_size: int = 100) -> float:
    """`tbsm-sdk build --all` (or the first `users` users); returns wall seconds."""
    if users is None:
        selection = ["--all"]
    else:
        from sdk_builder.runs import load_checkpoint

        selection = [a for u in load_checkpoint(run).users.ids[:users] for a in ("--user-shard", str(int(u)))]
    start = time.perf_counter()
    subprocess.run([*CLI, "build", str(run), *selection, "--out", str(out), "--shard-size", str(shard_size),
                    "--allow-weak-model", "--jobs", "1", "--json"], env=ENV, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--sample", type=int, default=5, help="Bundles verified one process each.")
    parser.add_argument("--work", type=Path, help="Keep the run and bundles here (reused when present).")
    parser.add_argument("--no-report", action="store_true", help="Print only; do not append to docs/benchmarks.md.")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="verify-many-"))
    run = tiny_run(work / "run", args.users)
    out = work / "bundles"
    if (out / "bundles.jsonl").exists():  # reused from an earlier run (--work): its build time is unknown here
        build_note = "bundles reused from an earlier run"
    else:
        build_note = f"`build --all` {build_all(run, out):.0f} s"
    index = out / "bundles.jsonl"
    entries = [json.loads(line) for line in index.read_text().splitlines() if line.strip()]

    start = time.perf_counter()
    done = subprocess.run([*CLI, "verify", "--index", str(index), "--json"], env=ENV, capture_output=True, text=True)
    one_call = time.perf_counter() - start
    summary = json.loads(done.stdout)["summary"]

    start = time.perf_counter()
    sample_ok = 0
    for entry in entries[: args.sample]:
        sample_ok += subprocess.run([*CLI, "verify", str(out / entry["path"])], env=ENV, capture_output=True).returncode == 0
    per_process = (time.perf_counter() - start) / max(1, min(args.sample, len(entries)))

    n = len(entries)
    rows = [
        [f"`verify --index` (one call, {n:,} bundles)", f"{one_call:.1f}", f"{1000 * one_call / n:.1f}",
         f"{summary['ok']:,} OK, {summary['failed']:,} failed"],
        [f"`verify BUNDLE`, one process per bundle ({min(args.sample, n)} sampled, x{n:,})", f"{per_process * n:.0f}",
         f"{1000 * per_process:.0f}", f"{sample_ok} OK"],
    ]
    table = markdown_table(["verify", "seconds", "ms per bundle", "result"], rows, "lrrl")
    print(table)
    print(f"speed-up of one call: {per_process * n / one_call:.0f}x; {build_note}")
    if not args.no_report:
        append_report("verify: many bundles in one call",
                      f"{n:,} bundles of a tiny synthetic run ({args.users:,} users, shard size 100, xnnpack), "
                      f"{build_note}, OMP_NUM_THREADS=1; one call is {per_process * n / one_call:.0f}x "
                      f"the one-process-per-bundle estimate", table)


if __name__ == "__main__":
    main()
