"""Many bundles: stamping vs full export, idempotent reruns, kill -9, bad input, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sdk_builder.bundle.golden import ShardView
from sdk_builder.bundle.many import CheckpointWatch
from sdk_builder.bundle.verify import verify_bundle
from sdk_builder.client import encode
from sdk_builder.formats import BundleError
from sdk_builder.program import slice_constants
from sdk_builder.recipes.base import compile_program
from sdk_builder.runtime import load_runtime_method
from sdk_builder.stamp import build_template

CLI = [sys.executable, "-m", "sdk_builder.cli"]


def run_cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def user_file(tmp_path: Path, ids) -> Path:
    f = tmp_path / "users.txt"
    f.write_text("".join(f"{u}\n" for u in ids))
    return f


def test_stamped_program_equals_full_export(builder):
    """The template stamped with a user's constants runs exactly like that user's own export."""
    user_ids = [int(u) for u in builder.ckpt.users.ids[20:22]]
    shards = [builder.shard_for(builder.user_row(u))[0] for u in user_ids]
    template = build_template(builder.model, builder.layout, "portable", shards[0], builder.ckpt.item_category)

    for user_id, shard in zip(user_ids, shards):
        stamped = load_runtime_method(template.stamp(slice_constants(builder.model, shard, builder.ckpt.item_category, builder.layout)))
        exported = load_runtime_method(compile_program(builder.model, shard, builder.ckpt.item_category, "portable", builder.layout))
        for case in builder.golden_cases(user_id, shard):
            request = encode(ShardView(builder.ckpt, shard), case.history, case.request_time, case.candidates).tensors()
            a, b = stamped.execute(request)[0], exported.execute(request)[0]
            assert float((a - b).abs().max()) == 0.0
            assert np.abs(a.numpy() - np.asarray(case.scores)).max() <= 1e-5


def test_batch_build_two_jobs_then_rerun_skips(trained_run, tmp_path):
    from sdk_builder.runs import load_checkpoint

    ids = [int(u) for u in load_checkpoint(trained_run).users.ids[:12]]
    out = tmp_path / "out"
    first = run_cli("build", str(trained_run), "--users", str(user_file(tmp_path, ids)), "--jobs", "2",
                    "--recipe", "portable", "--shard-size", "300", "--out", str(out), "--json")
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout)["summary"]
    assert summary["built"] == 12 and summary["guard_max_abs_diff"] <= 1e-6
    index = [json.loads(line) for line in (out / "bundles.jsonl").read_text().splitlines()]
    assert sorted(e["user_id"] for e in index) == sorted(ids)
    for entry in index:
        report = verify_bundle(out / entry["path"])
        assert report["max_abs_diff"] <= 1e-5
    again = run_cli("build", str(trained_run), "--users", str(user_file(tmp_path, ids)), "--recipe", "portable",
                    "--shard-size", "300", "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads(again.stdout)["summary"]["skipped_current"] == 12
    assert (out / "bundles.jsonl").read_text().splitlines() == [json.dumps(e, sort_keys=True) for e in index]


def test_kill_minus_nine_leaves_only_whole_bundles_and_rerun_completes(trained_run, tmp_path):
    from sdk_builder.runs import load_checkpoint

    ids = [int(u) for u in load_checkpoint(trained_run).users.ids[:120]]
    out = tmp_path / "out"
    args = ["build", str(trained_run), "--users", str(user_file(tmp_path, ids)), "--recipe", "portable",
            "--shard-size", "300", "--out", str(out), "--json"]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and len(list(out.glob("*/*/*/manifest.json"))) < 10:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = list(out.glob("*/*/*/manifest.json"))
    assert 10 <= len(finished) < len(ids), "the kill should land mid-run"
    for manifest in finished:  # every visible bundle is whole
        assert verify_bundle(manifest.parent)["ok"]
    rerun = run_cli(*args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout)["summary"]
    assert summary["skipped_current"] >= len(finished) and summary["built"] + summary["skipped_current"] == len(ids)
    assert not [p for p in out.rglob(".*tmp-*")], "stale temp dirs are cleared"


def test_unknown_users_are_listed_and_skipped_only_when_asked(trained_run, tmp_path):
    from sdk_builder.runs import load_checkpoint

    known = int(load_checkpoint(trained_run).users.ids[0])
    users = user_file(tmp_path, [known, 987654321, 123456789])
    out = tmp_path / "out"
    refused = run_cli("build", str(trained_run), "--users", str(users), "--out", str(out), "--recipe", "portable")
    assert refused.returncode != 0
    line = refused.stderr.strip().splitlines()[-1]
    assert "987654321" in line and "123456789" in line and "--skip-unknown" in line
    assert not out.exists() or not any(out.rglob("manifest.json"))
    ok = run_cli("build", str(trained_run), "--users", str(users), "--out", str(out), "--recipe", "portable",
                 "--shard-size", "300", "--skip-unknown", "--json")  # the run's cached template (conftest)
    assert ok.returncode == 0, ok.stderr[-2000:]
    summary = json.loads(ok.stdout)["summary"]
    assert summary["built"] == 1 and sorted(summary["unknown"]) == [123456789, 987654321]

    bad = tmp_path / "bad.txt"
    bad.write_text(f"{known}\nabc\n")
    result = run_cli("build", str(trained_run), "--users", str(bad), "--out", str(out))
    assert result.returncode != 0 and f"{bad}:2" in result.stderr.strip().splitlines()[-1]


def test_unwritable_output_fails_before_building(trained_run, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("build", str(trained_run), "--all", "--out", str(blocker / "bundles"))
    assert result.returncode != 0 and "not writable" in result.stderr.strip().splitlines()[-1]


def test_checkpoint_change_is_detected(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(b"one")
    watch = CheckpointWatch(ckpt)
    watch.check()
    ckpt.write_bytes(b"two!")
    with pytest.raises(BundleError, match="changed while bundles were being built"):
        watch.check()


def test_ray_backend_on_local_two_cpus(trained_run, tmp_path):
    pytest.importorskip("ray")
    from sdk_builder.runs import load_checkpoint

    ids = [int(u) for u in load_checkpoint(trained_run).users.ids[30:38]]
    out = tmp_path / "out"
    result = run_cli("build", str(trained_run), "--users", str(user_file(tmp_path, ids)), "--backend", "ray",
                     "--jobs", "2", "--recipe", "portable", "--shard-size", "300", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)["summary"]
    assert summary["backend"] == "ray" and summary["built"] == len(ids)
    for line in (out / "bundles.jsonl").read_text().splitlines():
        assert verify_bundle(out / json.loads(line)["path"])["ok"]
