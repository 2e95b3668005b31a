"""The C++ reference client (mobile_templates/native) against the Python ExecuTorch runtime.

The client is built with CMake into a temporary directory (cmake, a compiler, nlohmann/json and
OpenSSL are installed with apt-get when missing; the test fails when they cannot be). Every golden
case of real bundles (`client_bundles`: xnnpack, portable and int8 recipes) is replayed through the
client, the Python runtime and the expected scores: the client must match the one-thread Python
runtime bit for bit, the default runtime within 1e-6, and golden.json within its tolerance.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sdk_builder import formats
from sdk_builder.client import encode
from tests.support import (
    BROKEN_IDS, INPUT_ORDER, REPO, ensure_debian_packages, extra_cases, load_json, python_scores, python_scores_one_thread,
    reference_inputs, shard_ids,
)

NATIVE_SRC = REPO / "mobile_templates" / "native"
# Debian package -> is it usable here.
NATIVE_PACKAGES = {
    "cmake": lambda: shutil.which("cmake") is not None,
    "g++": lambda: (os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")) is not None,
    "nlohmann-json3-dev": lambda: Path("/usr/include/nlohmann/json.hpp").exists(),
    "libssl-dev": lambda: Path("/usr/include/openssl/evp.h").exists(),
}


def executorch_prefix() -> Path:
    """The installed executorch package directory (CMAKE_PREFIX_PATH of its CMake package)."""
    import executorch.version

    return Path(executorch.version.__file__).resolve().parent


def build_native_client(build_dir: Path) -> Path:
    """Configure and build mobile_templates/native into `build_dir`; returns the executable."""
    ensure_debian_packages(NATIVE_PACKAGES)
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    prefix = executorch_prefix()
    assert (prefix / "share" / "cmake" / "executorch-config.cmake").exists(), \
        f"{prefix}: this executorch wheel ships no CMake package (no C++ runtime)"
    configure = [cmake, "-S", str(NATIVE_SRC), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                 f"-DCMAKE_PREFIX_PATH={prefix}", f"-DCMAKE_CXX_COMPILER={cxx}"]
    for cmd in (configure, [cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    exe = build_dir / "tbsm_rank"
    assert exe.exists(), f"the build produced no {exe}"
    return exe


def run_client(exe: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"tbsm_rank {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


@pytest.fixture(scope="module")
def bundles(client_bundles) -> list[Path]:
    return client_bundles


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    return build_native_client(tmp_path_factory.mktemp("native-build"))


def test_the_bundles_cover_every_recipe(bundles):
    recipes = [load_json(b / "manifest.json")["recipe"] for b in bundles]
    assert sorted(set(recipes)) == ["int8", "portable", "xnnpack"], recipes


def test_bundles_follow_the_contract(bundles):
    for bundle in bundles:
        manifest = formats.Manifest.model_validate(load_json(bundle / formats.MANIFEST))
        assert manifest.format_version == formats.BUNDLE_FORMAT_VERSION
        names = {p.name for p in bundle.iterdir() if p.is_file()} - {formats.MANIFEST}
        assert set(manifest.files) == names
        for name, digest in manifest.files.items():
            assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
        assert [s.name for s in manifest.program.inputs] == list(INPUT_ORDER)
        assert load_json(bundle / formats.SCHEMA) == formats.events_json_schema()
        formats.GoldenSet.model_validate(load_json(bundle / formats.GOLDEN))


def test_reference_mapping_agrees_with_the_sdk_client(bundles):
    """The mapping these tests hold the templates to is the SDK's own (sdk_builder.client.encode)."""
    for bundle in bundles:
        manifest = formats.Manifest.model_validate(load_json(bundle / "manifest.json"))
        golden = load_json(bundle / "golden.json")
        for case in golden["cases"] + extra_cases(load_json(bundle / "manifest.json"), golden)["cases"]:
            # The SDK's parser takes at most max_history events (the phone drops older ones).
            events = case["history"].get("events", [])[-manifest.program.max_history:]
            history = formats.EventHistory(user_id=case["history"]["user_id"], events=events)
            sdk = encode(manifest, history, case["request_time"], case["candidates"])
            ours = reference_inputs(manifest.model_dump(by_alias=True, mode="json"), case["history"],
                                    case["request_time"], case["candidates"])
            for name in INPUT_ORDER:
                assert getattr(sdk, name).tolist() == ours[name], (bundle, case["name"], name)


def test_python_runtime_matches_golden(bundles):
    for bundle in bundles:
        manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
        for case in golden["cases"]:
            inputs = reference_inputs(manifest, case["history"], case["request_time"], case["candidates"])
            got = python_scores(bundle, inputs)
            diff = max(abs(a - b) for a, b in zip(got, case["scores"]))
            assert len(got) == len(case["scores"]) and diff <= golden["tolerance"], (bundle.name, case["name"], diff)


def test_native_golden_replay_matches_python_runtime_and_golden(bundles, client):
    rows = []
    for bundle in bundles:
        manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
        lines = json_lines(run_client(client, str(bundle), "--golden").stdout)
        by_name = {line["case"]: line for line in lines if "case" in line}
        assert set(by_name) == {c["name"] for c in golden["cases"]}, lines
        assert lines[-1].get("summary") and lines[-1]["ok"] is True, lines[-1]
        for case in golden["cases"]:
            inputs = reference_inputs(manifest, case["history"], case["request_time"], case["candidates"])
            rows.append((bundle, golden, case, by_name[case["name"]], inputs))
    one_thread = python_scores_one_thread([(row[0], row[4]) for row in rows])
    report = []
    for (bundle, golden, case, line, inputs), python_1t in zip(rows, one_thread):
        python = python_scores(bundle, inputs)  # this process's runtime, default thread pool
        native = line["scores"]
        assert len(native) == len(python) == len(python_1t) == len(case["scores"])
        vs_python = max(abs(a - b) for a, b in zip(native, python))
        vs_golden = max(abs(a - b) for a, b in zip(native, case["scores"]))
        # %.9g round-trips float32: compare as float32, bit for bit, with the one-thread runtime.
        identical = struct.pack(f"{len(native)}f", *native) == struct.pack(f"{len(python_1t)}f", *python_1t)
        assert identical, (bundle.name, case["name"], max(abs(a - b) for a, b in zip(native, python_1t)))
        assert vs_python <= 1e-6, (bundle.name, case["name"], vs_python)
        assert vs_golden <= golden["tolerance"], (bundle.name, case["name"], vs_golden)
        assert abs(line["max_abs_diff"] - vs_golden) <= 1e-6
        assert line["ok"] is True
        report.append((vs_python, vs_golden))
    summary = {
        "cases": len(report),
        "bit_identical_to_one_thread_python_runtime": True,
        "max_abs_diff_vs_python_runtime_default_threads": max(r[0] for r in report),
        "max_abs_diff_vs_golden": max(r[1] for r in report),
    }
    print("native golden replay:", json.dumps(summary))


def test_native_ranks_harder_requests_like_the_python_runtime(bundles, client, tmp_path):
    """Histories longer than max_history, ids outside the shard and at its edges, every behaviour."""
    for bundle in bundles:
        manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
        for case in extra_cases(manifest, golden)["cases"]:
            (tmp_path / "h.json").write_text(json.dumps(case["history"]))
            proc = run_client(client, str(bundle), "--events", str(tmp_path / "h.json"), "--candidates",
                              ",".join(map(str, case["candidates"])), "--request-time", str(case["request_time"]))
            ranked = json_lines(proc.stdout)
            expected = python_scores(bundle, reference_inputs(manifest, case["history"], case["request_time"],
                                                              case["candidates"]))
            by_id = {r["item_id"]: r["score"] for r in ranked}
            assert sorted(by_id) == sorted(set(case["candidates"])), (bundle.name, case["name"])
            for c, s in zip(case["candidates"], expected):
                assert abs(by_id[c] - s) <= 1e-6, (bundle.name, case["name"], c)


def test_native_ranks_an_events_file(bundles, client, tmp_path):
    bundle = bundles[0]
    manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
    case = max(golden["cases"], key=lambda c: len(c["history"]["events"]))
    # More than max_history events: the client must keep the last 20.
    events = case["history"]["events"]
    older = [dict(e, timestamp=max(0, events[0]["timestamp"] - 100)) for e in events[:5]]
    history = {"user_id": case["history"]["user_id"], "events": older + events}
    (tmp_path / "history.json").write_text(json.dumps(history))
    candidates = case["candidates"][:25] + [5]  # 5 is not in the shard: the OOV row
    proc = run_client(
        client, str(bundle), "--events", str(tmp_path / "history.json"),
        "--candidates", ",".join(map(str, candidates)), "--request-time", str(case["request_time"]),
    )
    ranked = json_lines(proc.stdout)
    expected = python_scores(bundle, reference_inputs(manifest, history, case["request_time"], candidates))
    assert sorted(r["item_id"] for r in ranked) == sorted(candidates)
    by_id = {r["item_id"]: r["score"] for r in ranked}
    for c, s in zip(candidates, expected):
        assert abs(by_id[c] - s) <= 1e-6
    scores = [r["score"] for r in ranked]
    assert scores == sorted(scores, reverse=True)


def test_native_refuses_a_tampered_model(bundles, client, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[0], bundle)
    data = bytearray((bundle / "model.pte").read_bytes())
    data[-1] ^= 0xFF
    (bundle / "model.pte").write_bytes(bytes(data))
    proc = run_client(client, str(bundle), "--golden", check=False)
    assert proc.returncode != 0 and "sha256" in proc.stderr


def test_native_refuses_an_unknown_format_version(bundles, client, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[0], bundle)
    manifest = load_json(bundle / "manifest.json")
    manifest["format_version"] = formats.BUNDLE_FORMAT_VERSION + 1
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = run_client(client, str(bundle), "--golden", check=False)
    assert proc.returncode != 0 and "format_version" in proc.stderr


@pytest.mark.parametrize("table", ["items", "categories"])
def test_native_refuses_broken_ids_in_one_line_naming_the_field(bundles, client, tmp_path, table):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles[0], bundle)
    manifest = load_json(bundle / "manifest.json")
    for broken, reason in {**BROKEN_IDS, "[1, 2]": "not a string"}.items():
        manifest[table]["ids"] = json.loads(broken) if broken.startswith("[") else broken
        (bundle / "manifest.json").write_text(json.dumps(manifest))
        proc = run_client(client, str(bundle), "--golden", check=False)
        assert proc.returncode != 0 and proc.stderr.startswith(f"error: manifest.json {table}.ids: "), proc.stderr
        assert reason in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_native_accepts_a_history_without_events(bundles, client, tmp_path):
    bundle = bundles[0]
    manifest = load_json(bundle / "manifest.json")
    history = {"user_id": manifest["user_id"]}  # valid: "events" defaults to []
    (tmp_path / "h.json").write_text(json.dumps(history))
    candidates = shard_ids(manifest["items"])[:3]
    proc = run_client(client, str(bundle), "--events", str(tmp_path / "h.json"),
                      "--candidates", ",".join(map(str, candidates)), "--request-time", "1700000000")
    expected = python_scores(bundle, reference_inputs(manifest, history, 1_700_000_000, candidates))
    got = {r["item_id"]: r["score"] for r in json_lines(proc.stdout)}
    assert all(abs(got[c] - s) <= 1e-6 for c, s in zip(candidates, expected))


def test_native_rejects_unordered_history(bundles, client, tmp_path):
    bundle = bundles[0]
    golden = load_json(bundle / "golden.json")
    case = next(c for c in golden["cases"] if len({e["timestamp"] for e in c["history"]["events"]}) >= 2)
    history = dict(case["history"], events=list(reversed(case["history"]["events"])))
    (tmp_path / "h.json").write_text(json.dumps(history))
    proc = run_client(
        client, str(bundle), "--events", str(tmp_path / "h.json"), "--candidates", "1,2", check=False
    )
    assert proc.returncode != 0 and "timestamp" in proc.stderr


def test_native_bench(bundles, client):
    proc = run_client(client, str(bundles[0]), "--bench", "200")
    lines = [line for line in json_lines(proc.stdout) if "bench" in line]
    assert {line["candidates"] for line in lines} == {1, 1000}
    for line in lines:
        assert line["threads"] == 1 and 0 < line["median_us"] <= line["p99_us"]
    print("native bench:", json.dumps(lines))


def test_native_client_replays_a_cold_start_bundle(builder, client, tmp_path):
    """manifest.user_id and the golden histories' user_id are null (kind cold_start): read, and replayed."""
    from sdk_builder.bundle.coldstart import build_cold_start

    bundle = build_cold_start(builder, tmp_path).path
    lines = json_lines(run_client(client, str(bundle), "--golden").stdout)
    assert {line["case"] for line in lines if "case" in line} == {c["name"] for c in load_json(bundle / "golden.json")["cases"]}
    assert lines[-1].get("summary") and lines[-1]["ok"] is True, lines[-1]


def _moved(state: list[float], shipped: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(state, shipped))


def test_native_refresh_matches_the_python_client(refresh_client_bundle, client, tmp_path):
    from sdk_builder.client import Bundle

    bundle = refresh_client_bundle
    manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
    python = Bundle(bundle)
    # The user's longest golden history, and a longer one (older events first) so the program's
    # max_history + window inputs are full: the client keeps only the last W events.
    events = max((c["history"]["events"] for c in golden["cases"]), key=len)
    longer = [dict(e, timestamp=max(0, events[0]["timestamp"] - 1000 + k)) for k, e in enumerate(events)] + events
    state_file = tmp_path / "history.state.json"
    for k, event_list in enumerate([events, longer]):
        history = {"user_id": manifest["user_id"], "events": event_list}
        (tmp_path / "h.json").write_text(json.dumps(history))
        start = python.manifest.user_state if k == 0 else load_json(state_file)["user_state"]
        # --state: the first run starts from the shipped state (no file), the second from the first's.
        native = json_lines(run_client(client, str(bundle), "--refresh", str(tmp_path / "h.json"),
                                       "--state", str(state_file)).stdout)[0]
        # A list of events: an EventHistory holds at most max_history of them.
        expected = python.refresh(start, [formats.Event(**e) for e in event_list]).tolist()
        diff = max(abs(a - b) for a, b in zip(native["user_state"], expected))
        assert len(native["user_state"]) == len(expected) and diff <= 1e-5, (k, diff)
        assert _moved(native["user_state"], start) > 1e-4, "the refresh left the state where it was"
        assert _moved(native["user_state"], manifest["user_state"]) <= manifest["refresh"]["max_drift"] + 1e-6
        assert len(native["losses"]) == manifest["refresh"]["steps"]
        saved = load_json(state_file)
        assert saved["manifest_sha256"] == hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
        assert saved["user_state"] == native["user_state"]
        formats.RefreshedState.model_validate(saved)
        print("native refresh vs python client:", json.dumps({"case": k, "max_abs_diff": diff,
                                                              "moved": _moved(native["user_state"], start)}))


def test_native_ranks_with_the_refreshed_state_of_its_bundle_only(refresh_client_bundle, client, tmp_path):
    bundle = refresh_client_bundle
    manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
    case = max(golden["cases"], key=lambda c: len(c["history"]["events"]))
    (tmp_path / "h.json").write_text(json.dumps(case["history"]))
    state_file = tmp_path / "history.state.json"
    run_client(client, str(bundle), "--refresh", str(tmp_path / "h.json"), "--state", str(state_file))
    refreshed = load_json(state_file)
    rank = ["--events", str(tmp_path / "h.json"), "--candidates", ",".join(map(str, case["candidates"])),
            "--request-time", str(case["request_time"]), "--state", str(state_file)]
    ranked = []
    for state, tag in ((refreshed["user_state"], refreshed["manifest_sha256"]), (manifest["user_state"], "0" * 64)):
        state_file.write_text(json.dumps(dict(refreshed, manifest_sha256=tag)))  # another bundle's state is ignored
        got = {r["item_id"]: r["score"] for r in json_lines(run_client(client, str(bundle), *rank).stdout)}
        inputs = reference_inputs(manifest, case["history"], case["request_time"], case["candidates"], state)
        for c, s in zip(case["candidates"], python_scores(bundle, inputs)):
            assert abs(got[c] - s) <= 1e-6, (tag[:4], c)
        ranked.append(got)
    assert max(abs(ranked[0][c] - ranked[1][c]) for c in case["candidates"]) > 1e-5, "the state changed no score"


def test_native_golden_replays_the_refresh_cases(refresh_client_bundle, client):
    golden = load_json(refresh_client_bundle / "golden.json")
    assert golden["refresh_cases"], "a bundle built with a refresh program has refresh cases"
    lines = json_lines(run_client(client, str(refresh_client_bundle), "--golden").stdout)
    replayed = {line["refresh_case"]: line for line in lines if "refresh_case" in line}
    assert set(replayed) == {c["name"] for c in golden["refresh_cases"]}
    for case in golden["refresh_cases"]:
        line = replayed[case["name"]]
        assert line["ok"] is True and line["max_abs_diff"] <= case["tolerance"], line
        assert max(abs(a - b) for a, b in zip(line["user_state"], case["state_after"])) <= case["tolerance"]
    assert lines[-1]["summary"] and lines[-1]["refresh_cases"] == len(golden["refresh_cases"]) and lines[-1]["ok"]
