"""On-device refresh on the native C++ client (issue 13): time per refresh update, one thread, and
the refresh program's size, in one run.

Builds mobile_templates/native with CMake against the executorch wheel's runtime (as
benchmarks/native_latency.py does). For each bundle built with `--refresh` (--bundle, or one bundle
of the first user of --run, built here with a refresh program) it runs `tbsm_rank BUNDLE --refresh
HISTORY --runs N --threads 1` on the longest history of the bundle's golden cases (refresh cases
included): one refresh update is the whole loop a phone runs every `every_events` events
(`refresh.steps` calls of refresh.pte plus the float32 update and clip). In the same run it times the
ranking call the phone makes most (`--bench`: 1000 candidates, history of 20), so the update is also
given as a multiple of one ranking call. Prints a markdown table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.native_latency import build_client, client_bench  # noqa: E402
from benchmarks.report import append_report  # noqa: E402


def longest_history(bundle: Path, user_id: int) -> dict:
    golden = json.loads((bundle / "golden.json").read_text())
    event_lists = [c["history"].get("events", []) for c in golden["cases"]]
    event_lists += [c["events"] for c in golden.get("refresh_cases", [])]
    return {"user_id": user_id, "events": max(event_lists, key=len)}


def refresh_bench(exe: Path, bundle: Path, history: Path, runs: int) -> tuple[dict, dict]:
    cmd = [str(exe), str(bundle), "--refresh", str(history), "--runs", str(runs), "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return next(r for r in lines if r.get("refresh")), next(r for r in lines if r.get("bench"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained run: a bundle of its first user is built with --refresh.")
    parser.add_argument("--bundle", type=Path, action="append", default=[], help="Bundle directories built with --refresh.")
    parser.add_argument("--runs", type=int, default=500, help="Refresh updates timed per bundle.")
    parser.add_argument("--no-report", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    if not args.bundle and not args.run:
        parser.error("give --run or --bundle")
    tmp = Path(tempfile.mkdtemp(prefix="tbsm-refresh-bench-"))
    exe = build_client(tmp / "build")

    from sdk_builder.client import read_manifest

    bundles = list(args.bundle)
    if args.run:
        from sdk_builder.bundle.build import BundleBuilder
        from sdk_builder.data.dataset import PreparedData
        from sdk_builder.refresh import RefreshConfig
        from sdk_builder.runs import DATA, load_checkpoint

        ckpt = load_checkpoint(args.run)
        builder = BundleBuilder(ckpt, PreparedData.load(Path(args.run) / DATA), recipe="xnnpack", stamping=False,
                                allow_weak_model=True, refresh=RefreshConfig())
        bundles.append(builder.build(int(ckpt.users.ids[0]), tmp / "bundles").path)

    rows = []
    for bundle in bundles:
        manifest = read_manifest(bundle)
        spec = manifest.refresh
        if spec is None:
            sys.exit(f"{bundle}: built without --refresh (manifest refresh is null)")
        history = tmp / f"{bundle.name}-history.json"
        history.write_text(json.dumps(longest_history(bundle, manifest.user_id)))
        rank_before = client_bench(exe, bundle, 500)[1000]["median_us"]
        result, timing = refresh_bench(exe, bundle, history, args.runs)
        rank_after = client_bench(exe, bundle, 500)[1000]["median_us"]
        rank = (rank_before + rank_after) / 2
        window = spec.events
        rows.append(
            f"| {bundle} ({manifest.recipe}) | {len(manifest.user_state)} | {spec.steps} | {window} | "
            f"{(bundle / spec.file).stat().st_size:,} | {(bundle / 'model.pte').stat().st_size:,} | "
            f"{timing['median_us']:.0f} / {timing['p99_us']:.0f} | {timing['median_us'] / max(spec.steps, 1):.0f} | "
            f"{rank:.0f} ({rank_before:.0f}, {rank_after:.0f}) | {timing['median_us'] / rank:.2f}x | "
            f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f} |")
    table = "\n".join([
        "| bundle | state size S | steps | events read W | refresh.pte bytes | model.pte bytes | "
        "refresh update, median / p99 (us) | per step (us) | ranking call, 1000 candidates, median (us) (before, after) | "
        "update / ranking call | loss, first -> last step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        *rows,
    ])
    print(table)
    if not args.no_report:
        append_report("on-device refresh on the native client (issue 13)",
                      f"`tbsm_rank --refresh HISTORY --runs {args.runs} --threads 1` on the longest golden history; "
                      "ranking: `tbsm_rank --bench 500 --threads 1`, same run", table)


if __name__ == "__main__":
    main()
