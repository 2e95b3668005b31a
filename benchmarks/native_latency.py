"""Native C++ client latency vs one GEMM of the same size class (issue 12), in one run.

Builds mobile_templates/native with CMake against the executorch wheel's prebuilt runtime (as
tests/test_native_client.py does), then for each bundle (--bundle, or one xnnpack and one int8
bundle of the first user of --run) runs `tbsm_rank BUNDLE --bench N --threads 1` (history of 20,
1 and 1000 candidates) and times, in this process right before and after each client run, one
3.9M-MAC GEMM (`torch.mm` of 1000x64 by 64x61, one thread). The ratio is the client's median over
the mean of the two GEMM medians. MACs per candidate: the matrix products (linear, mm, bmm) of the
program's eager forward, counted by torch's FlopCounterMode, 1000 candidates minus 1, per candidate.
Prints a markdown table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import append_report  # noqa: E402

TARGET_RATIO = 1.1
GEMM_SHAPE = (1000, 64, 61)  # (m, k, n): 3.9M multiply-adds


def build_client(build_dir: Path) -> Path:
    import executorch.version

    prefix = Path(executorch.version.__file__).resolve().parent
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install cmake g++ nlohmann-json3-dev libssl-dev")
    for cmd in (["cmake", "-S", str(ROOT / "mobile_templates" / "native"), "-B", str(build_dir),
                 "-DCMAKE_BUILD_TYPE=Release", f"-DCMAKE_PREFIX_PATH={prefix}"],
                ["cmake", "--build", str(build_dir), "-j", "2"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return build_dir / "tbsm_rank"


def gemm_median_us(repeats: int) -> float:
    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(50):
        torch.mm(a, b)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples) * 1e6)


def client_bench(exe: Path, bundle: Path, runs: int) -> dict[int, dict]:
    proc = subprocess.run([str(exe), str(bundle), "--bench", str(runs), "--threads", "1"], capture_output=True,
                          text=True, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"tbsm_rank {bundle} --bench failed:\n{proc.stdout}\n{proc.stderr}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["candidates"]: r for r in rows if r.get("bench")}


def macs_per_candidate(program: torch.nn.Module, state_size: int) -> float:
    """Multiply-adds of the matrix products per candidate (1000 candidates minus 1, / 999)."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdk_builder.formats import MAX_HISTORY
    from model.tbsm import OOV_ROW

    def flops(n: int) -> int:
        inputs = [torch.zeros(MAX_HISTORY, dtype=torch.long)] * 4 + [torch.zeros(1, dtype=torch.long),
                                                                    torch.full((n,), OOV_ROW, dtype=torch.long),
                                                                    torch.zeros(state_size)]
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            program(*inputs)
        return counter.get_total_flops()

    return (flops(1000) - flops(1)) / 999 / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="A trained run: bundles of its first user are built (xnnpack, int8).")
    parser.add_argument("--bundle", type=Path, action="append", default=[], help="Bundle directories to time.")
    parser.add_argument("--runs", type=int, default=2000, help="Client runs per measure.")
    parser.add_argument("--no-report", action="store_true", help="Do not append to docs/benchmarks.md.")
    args = parser.parse_args()
    if not args.bundle and not args.run:
        parser.error("give --run or --bundle")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="tbsm-native-bench-"))
    exe = build_client(tmp / "build")

    from sdk_builder.client import read_manifest

    bundles = list(args.bundle)
    programs: dict[str, torch.nn.Module] = {}
    if args.run:
        from sdk_builder.bundle.build import BundleBuilder
        from sdk_builder.data.dataset import PreparedData
        from sdk_builder.runs import DATA, load_checkpoint

        ckpt = load_checkpoint(args.run)
        data = PreparedData.load(Path(args.run) / DATA)
        user_id = int(ckpt.users.ids[0])
        for recipe in ("xnnpack", "int8"):
            builder = BundleBuilder(ckpt, data, recipe=recipe, stamping=False, allow_weak_model=True,
                                    on_budget_exceeded="fp32")
            bundles.append(builder.build(user_id, tmp / recipe).path)
            shard, _ = builder.shard_for(builder.user_row(user_id))
            programs[str(bundles[-1])] = builder.steps.program(builder.model, builder.constants_for(shard)).eval()

    rows = []
    for bundle in bundles:
        manifest = read_manifest(bundle)
        before = gemm_median_us(2000)
        timing = client_bench(exe, bundle, args.runs)
        after = gemm_median_us(2000)
        gemm = (before + after) / 2
        big = timing[1000]
        ratio = big["median_us"] / gemm
        macs = programs.get(str(bundle))
        rows.append(f"| {bundle} ({manifest.recipe}, {len(manifest.items.ids)} items) | "
                    f"{timing[1]['median_us']:.0f} / {timing[1]['p99_us']:.0f} | {big['median_us']:.0f} / {big['p99_us']:.0f} | "
                    f"{gemm:.0f} ({before:.0f}, {after:.0f}) | {ratio:.2f}x | "
                    f"{'-' if macs is None else f'{macs_per_candidate(macs, len(manifest.user_state)):,.0f}'} | "
                    f"<= {TARGET_RATIO}x | {'yes' if ratio <= TARGET_RATIO else 'NO'} |")
    table = "\n".join([
        "| bundle | 1 candidate, median / p99 (us) | 1000 candidates, median / p99 (us) | "
        "GEMM 1000x64 by 64x61, median (us) (before, after) | client / GEMM | matrix MACs per candidate | target | met |",
        "|---|---:|---:|---:|---:|---:|---|---|",
        *rows,
    ])
    print(table)
    if not args.no_report:
        append_report("native client latency vs GEMM (issue 12)",
                      f"`tbsm_rank --bench {args.runs} --threads 1`, history of 20; GEMM: torch.mm, 1 thread, same run", table)


if __name__ == "__main__":
    main()
