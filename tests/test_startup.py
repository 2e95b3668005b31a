"""Start-up of the phone-side commands: what they import (the wall-time target itself is measured
by benchmarks/startup.py, never in a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from sdk_builder.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("\\nTORCH:%s" % ("torch" in sys.modules))
"""


def run_probe(*args: str) -> tuple[subprocess.CompletedProcess, bool]:
    """A command in a fresh interpreter, and whether it imported torch (by the time it returned)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=REPO,
                            timeout=300)
    return result, result.stdout.rstrip().endswith("TORCH:True")


def test_inspect_reads_a_bundle_without_torch(built_bundle):
    result, imported_torch = run_probe("inspect", str(built_bundle), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not imported_torch
    report = json.loads(result.stdout.rsplit("TORCH:", 1)[0])
    program = next(f for f in report["files"] if f["name"] == "model.pte")
    assert {"item_table", "category_table"} <= {p["name"] for p in program["parts"]}
    for file in report["files"]:
        assert sum(p["bytes"] for p in file["parts"]) == file["bytes"] == (Path(built_bundle) / file["name"]).stat().st_size
