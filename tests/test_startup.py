"""Start-up of the phone-side commands: what they import (the wall-time target itself is measured
by benchmarks/startup.py, never in a test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from sdk_builder.program import USER_CONSTANTS

REPO = Path(__file__).resolve().parents[1]
PROBE = """
import sys
from sdk_builder.cli import main
try:
    main(sys.argv[2:], standalone_mode=False)
finally:
    print("\\nLOADED:%s" % (sys.argv[1] in sys.modules))
"""


def run_probe(*args: str, module: str = "torch") -> tuple[subprocess.CompletedProcess, bool]:
    """A command in a fresh interpreter, and whether it imported `module` (by the time it returned)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PROBE, module, *args], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    return result, result.stdout.rstrip().endswith("LOADED:True")


def test_inspect_reads_a_bundle_without_torch(built_bundle):
    result, imported_torch = run_probe("inspect", str(built_bundle), "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not imported_torch
    report = json.loads(result.stdout.rsplit("LOADED:", 1)[0])
    program = next(f for f in report["files"] if f["name"] == "model.pte")
    # Every per-user table is named, those read through item_slot too.
    assert set(USER_CONSTANTS) <= {p["name"] for p in program["parts"]}
    for file in report["files"]:
        assert sum(p["bytes"] for p in file["parts"]) == file["bytes"] == (Path(built_bundle) / file["name"]).stat().st_size


def test_rank_runs_the_program_without_torchs_meta_kernels(built_bundle, tmp_path):
    """`rank` declares a runtime-only process: torch skips its meta kernels, the scores are the golden ones."""
    case = json.loads((Path(built_bundle) / "golden.json").read_text())["cases"][0]
    events = tmp_path / "history.json"
    events.write_text(json.dumps(case["history"]))
    result, loaded = run_probe("rank", str(built_bundle), "--events", str(events),
                               "--candidates", ",".join(map(str, case["candidates"])),
                               "--request-time", str(case["request_time"]), "--json", module="torch._meta_registrations")
    assert result.returncode == 0, result.stderr[-2000:]
    assert not loaded
    scores = {r["item_id"]: r["score"] for r in json.loads(result.stdout.rsplit("LOADED:", 1)[0])["ranked"]}
    for item, expected in zip(case["candidates"], case["scores"]):
        assert abs(scores[item] - expected) <= 1e-5


def test_the_meta_kernels_load_before_the_compiler_in_a_runtime_only_process(built_bundle):
    code = f"""
import sys
from sdk_builder.runtime import load_runtime_method, runtime_only_process
runtime_only_process()
load_runtime_method({str(Path(built_bundle) / "model.pte")!r})
print("torch" in sys.modules, "torch._meta_registrations" in sys.modules)
import torch._dynamo
print("torch._meta_registrations" in sys.modules, hasattr(sys.modules["torch"], "_meta_registrations"))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "False", "True", "True"]


def test_argument_errors_are_reported_before_torch_is_imported(tmp_path):
    """Bad arguments fail in a fraction of a second: one line, non-zero exit, torch never imported."""
    run = tmp_path / "run"
    run.mkdir()
    events = tmp_path / "history.json"
    events.write_text(json.dumps({"user_id": 1, "events": []}))
    cases = {
        ("build", str(run), "--user-shard", "abc", "--out", str(tmp_path / "out")): "user id 'abc'",
        ("build", str(run), "--out", str(tmp_path / "out")): "no users",
        ("build", str(run), "--user-shard", "1", "--shard-size", "0", "--out", str(tmp_path / "out")): "--shard-size",
        ("rank", str(tmp_path), "--events", str(events), "--candidates", "1,x"): "candidates: 'x'",
        ("rank", str(tmp_path), "--events", str(events), "--candidates", "1", "--top", "-1"): "--top",
        ("rank", str(tmp_path), "--events", str(tmp_path / "missing.json"), "--candidates", "1"): "missing.json",
        ("verify", str(tmp_path), "--patch", str(tmp_path / "p")): "--patch P --old OLD",
    }
    for args, message in cases.items():
        result, imported_torch = run_probe(*args)
        assert result.returncode != 0 and message in result.stderr, (args, result.stderr[-500:])
        assert not imported_torch, args
