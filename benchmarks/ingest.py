"""Ingestion benchmark: time and peak memory of read_taobao_csv on synthetic Taobao rows.

Generates (or reuses from the temp dir) a headerless Taobao CSV with ``--rows`` rows, reads it in a
fresh subprocess, prints a markdown table and appends it to docs/benchmarks.md under "## Ingestion".

Linux carries a parent's RSS high-water mark into a child's ru_maxrss across fork/exec, so this
process only orchestrates (stdlib imports only) and generation runs in its own subprocess too;
otherwise the 10M-row generation would inflate the measured peak.

    python benchmarks/ingest.py [--rows 10000000]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import DOC, REPO, append_to_doc, cpu_count, git_commit

SECTION = "## Ingestion"
SEED = 0

GENERATE = """
import math, sys
from sdk_builder.data.synthetic import generate_taobao_events, write_taobao_csv
rows, seed, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
n_items = min(1_000_000, max(1_000, rows // 10))
# 70 events per user on average (generator default 20..120); 5% spare, then cut to exactly `rows`.
events = generate_taobao_events(math.ceil(rows / 70 * 1.05) + 10, n_items=n_items,
                                n_categories=max(20, min(5_000, n_items // 200)), seed=seed)
if len(events) < rows:
    sys.exit(f"generated {len(events)} events, fewer than {rows}")
write_taobao_csv(events.take(slice(0, rows)), path)
"""

# ru_maxrss is a high-water mark: read once after imports (baseline) and once after the read.
MEASURE = """
import json, resource, sys, time
import pyarrow
from sdk_builder.data.events import read_taobao_csv
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
log, report = read_taobao_csv(sys.argv[1])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
arrays = sum(getattr(log, f).nbytes for f in ("user", "item", "category", "behavior", "timestamp"))
print(json.dumps({"seconds": seconds, "peak_kib": peak, "base_kib": base, "array_bytes": arrays,
                  "rows_read": report.rows_read, "rows_kept": report.rows_kept,
                  "pyarrow": pyarrow.__version__}))
"""


def run_python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter with the repo importable; return its stdout."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=path),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"benchmark subprocess failed:\n{done.stderr}")
    return done.stdout


def synthetic_csv(rows: int) -> Path:
    """Path of a cached CSV with exactly ``rows`` synthetic rows, generated on first use."""
    path = Path(tempfile.gettempdir()) / "tbsm-bench" / f"taobao_{rows}_seed{SEED}.csv"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        run_python(GENERATE, str(rows), str(SEED), str(partial))
        partial.replace(path)  # a cache file is either complete or absent
    return path


def measure(path: Path) -> dict[str, float | str]:
    return json.loads(run_python(MEASURE, str(path)).strip().splitlines()[-1])


def markdown(result: dict[str, float | str], file_bytes: int) -> str:
    mib = 1 << 20
    columns = {
        "rows read": f"{result['rows_read']:,}",
        "rows kept": f"{result['rows_kept']:,}",
        "CSV MiB": f"{file_bytes / mib:,.0f}",
        "read s": f"{result['seconds']:.2f}",
        "rows/s": f"{result['rows_read'] / result['seconds']:,.0f}",
        "peak RSS MiB": f"{result['peak_kib'] / 1024:,.0f}",
        "RSS after imports MiB": f"{result['base_kib'] / 1024:,.0f}",
        "event arrays MiB": f"{result['array_bytes'] / mib:,.0f}",
    }
    return "\n".join(
        [
            "| " + " | ".join(columns) + " |",
            "|" + "---:|" * len(columns),
            "| " + " | ".join(columns.values()) + " |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of synthetic data (default 10M)")
    args = parser.parse_args()

    path = synthetic_csv(args.rows)
    result = measure(path)
    table = markdown(result, path.stat().st_size)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    context = (
        f"{when}, commit {git_commit()}, nproc {cpu_count()}, Python {platform.python_version()}, "
        f"pyarrow {result['pyarrow']}; read_taobao_csv in a fresh process, synthetic data "
        f"(`benchmarks/ingest.py --rows {args.rows}`)"
    )
    print(table)
    append_to_doc(SECTION, f"{context}\n\n{table}")
    print(f"\nappended to {DOC}")


if __name__ == "__main__":
    main()
