"""Wall time of the phone-side commands (`--help`, `rank`, `verify`, `inspect`, and `rank` with a bad
argument) on one bundle, and with --run of a second `build` of one user (the template cached by an
earlier build) and of an unknown id, before and after the start-up work, in one run; two floors:
`import torch` alone, and what running a program needs at least (`FLOORS`).

"Before" is a checkout of --before-ref (default: the commit before the start-up work) extracted
with `git archive` into a temporary directory; "after" is this checkout. Each command runs
--repeats times per checkout, alternating, in a fresh interpreter (OMP_NUM_THREADS=1); the table
shows the median wall time and whether the run imported `executorch.exir` (the export stack) and
torch.
Needs a bundle: --bundle DIR, or one is built from a tiny synthetic run (about a minute).
Prints a markdown table and appends it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import export_revision, markdown_table  # noqa: E402
from benchmarks.report import append_report  # noqa: E402

BEFORE_REF = "0ae52de"  # main before the start-up work (issue 12)
PROBE = ("import runpy, sys\n"
         "try:\n"
         "    runpy.run_module('sdk_builder.cli', run_name='__main__', alter_sys=True)\n"
         "finally:\n"
         "    sys.stderr.write('EXIR_LOADED=%d\\n' % any(m.startswith('executorch.exir') for m in sys.modules))\n"
         "    sys.stderr.write('TORCH_LOADED=%d\\n' % ('torch' in sys.modules))\n")

# What no command can go below: torch's import, and what `rank` and `verify` must import to run a
# program at all (torch without its meta kernels, then the runtime's extension module).
FLOORS = {
    "python -c 'import torch' (floor)": "import torch",
    "torch without meta kernels + the runtime extension (floor of rank, verify)":
        "from sdk_builder.runtime import _extension, runtime_only_process\nruntime_only_process()\n_extension()",
}


def tiny_bundle(work: Path) -> Path:
    """One bundle of a small synthetic run (the verify_many benchmark's recipe, 200 users)."""
    from benchmarks.verify_many import build_all, tiny_run

    run = tiny_run(work / "run", users=200)
    out = work / "bundles"
    build_all(run, out, users=1)
    return out / json.loads((out / "bundles.jsonl").read_text().splitlines()[0])["path"]


_CALLS = iter(range(10**9))


def timed(checkout: Path, args: list[str] | str) -> tuple[float, float, bool, bool, int]:
    """Wall seconds, CPU seconds (user + system: less sensitive to a busy machine), exir loaded, torch
    loaded, exit code, of CLI arguments or (a str) of a Python snippet, a floor.
    "{n}" in an argument becomes a number new on every call (a fresh --out: the bundle is built, not skipped)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    call = next(_CALLS)
    floor = isinstance(args, str)
    probe = ["-c", args] if floor else ["-c", PROBE, *(a.replace("{n}", str(call)) for a in args)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *probe], cwd=checkout, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return seconds, cpu, "EXIR_LOADED=1" in done.stderr, floor or "TORCH_LOADED=1" in done.stderr, done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="A bundle directory (default: build one from a tiny run).")
    parser.add_argument("--run", type=Path, help="A run directory: also time `build --user-shard` of its bundle's user "
                        "(the first, untimed call fills the run's template cache).")
    parser.add_argument("--before-ref", default=BEFORE_REF)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-report", action="store_true", help="Print only; do not append to docs/benchmarks.md.")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    bundle = args.bundle or tiny_bundle(work)
    golden = json.loads((bundle / "golden.json").read_text())
    history = work / "history.json"
    history.write_text(json.dumps(golden["cases"][0]["history"]))
    candidates = ",".join(map(str, golden["cases"][0]["candidates"]))
    commands = {
        "--help": ["--help"],
        "rank": ["rank", str(bundle), "--events", str(history), "--candidates", candidates, "--request-time", "1512000000"],
        "verify": ["verify", str(bundle)],
        "inspect": ["inspect", str(bundle)],
        "rank (bad --candidates)": ["rank", str(bundle), "--events", str(history), "--candidates", "1,x"],
    }
    if args.run:
        user = str(golden["cases"][0]["history"]["user_id"])
        commands["build (cached template)"] = ["build", str(args.run), "--user-shard", user, "--out", str(work / "out-{n}")]
        commands["build (unknown user id)"] = ["build", str(args.run), "--user-shard", "999999999999", "--out", str(work / "out-{n}")]
    checkouts = {"before": export_revision(args.before_ref, work / "before"), "after": ROOT}
    times: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    exir: dict[tuple[str, str], bool] = {}
    torch: dict[tuple[str, str], bool] = {}
    codes: dict[tuple[str, str], int] = {}
    commands.update(FLOORS)
    for name, which in [(c, w) for c in commands for w in checkouts]:  # warm the page cache once
        timed(checkouts[which], commands[name])
    for _ in range(args.repeats):
        for name in commands:
            for which, checkout in checkouts.items():
                seconds, cpu_seconds, loaded, torch_loaded, code = timed(checkout, commands[name])
                times.setdefault((name, which), []).append(seconds)
                cpu.setdefault((name, which), []).append(cpu_seconds)
                exir[(name, which)] = loaded
                torch[(name, which)] = torch_loaded
                codes[(name, which)] = code
    rows = []
    for name in commands:
        before, after = (statistics.median(times[(name, w)]) for w in ("before", "after"))
        cpu_before, cpu_after = (statistics.median(cpu[(name, w)]) for w in ("before", "after"))
        rows.append([name if name in FLOORS else f"`tbsm-sdk {name}`", f"{before:.2f}", f"{after:.2f}", f"{before / after:.1f}x",
                     f"{cpu_before:.2f}", f"{cpu_after:.2f}",
                     "yes" if exir[(name, "before")] else "no", "yes" if exir[(name, "after")] else "no",
                     "yes" if torch[(name, "before")] else "no", "yes" if torch[(name, "after")] else "no",
                     f"{codes[(name, 'before')]}/{codes[(name, 'after')]}"])
    table = markdown_table(["command (one bundle)", "before s", "after s", "speed-up", "before CPU s", "after CPU s",
                            "exir before", "exir after", "torch before", "torch after", "exit codes"], rows, "lrrrrrlllll")
    print(table)
    if not args.no_report:
        append_report("Start-up of the phone-side commands",
                      f"median wall and CPU (user + system) time of {args.repeats} fresh interpreters per cell, OMP_NUM_THREADS=1, before = "
                      f"`{args.before_ref}`, after = this commit, bundle {bundle.name} ({sum(f.stat().st_size for f in bundle.iterdir()):,} B)",
                      table)


if __name__ == "__main__":
    main()
