"""Tampered bundles, hostile requests and a full disk: each is a one-line error and a non-zero exit,
never a traceback, and a tampered manifest never passes `verify` with the index or the key.

The commands run in-process (click's runner) on copies of the session's bundle: one runtime, no
interpreter start per case. `test_command_paths_do_not_import_the_exporter` runs real processes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk_builder.bundle import store
from sdk_builder.bundle.store import INDEX, check_output, sign_bundle, write_index
from sdk_builder.cli import main
from sdk_builder.client import encode, parse_history, read_manifest
from sdk_builder.formats import SIGNATURE, BundleError
from sdk_builder.formats import decode_ids, encode_ids
from tests.support import BROKEN_IDS, edit_shard_ids, shard_ids

INT64_MAX = 2**63 - 1


def cli(*args: str):
    """(exit code, stdout, stderr) of a command run in this process; a traceback fails the test."""
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"tbsm-sdk {' '.join(args)} raised {type(result.exception).__name__}: {result.exception}")
    return result.exit_code, result.stdout, result.stderr


def one_line_failure(code: int, stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith(("Error: ", "FAILED ")), (code, stderr)
    return lines[0]


def copy_of(bundle: Path, tmp_path: Path, name: str = "b") -> Path:
    return Path(shutil.copytree(bundle, tmp_path / name))


def edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def rehash(bundle: Path, name: str) -> None:
    digest = hashlib.sha256((bundle / name).read_bytes()).hexdigest()
    edit_manifest(bundle, lambda m: m["files"].__setitem__(name, digest))


def index_for(root: Path, bundles: list[Path]) -> Path:
    """A bundles.jsonl as `build` writes it (one line per bundle; copies of one bundle share a user)."""
    lines = [json.dumps({"user_id": json.loads((b / "manifest.json").read_text())["user_id"], "path": str(b.relative_to(root)),
                         "manifest_sha256": hashlib.sha256((b / "manifest.json").read_bytes()).hexdigest(),
                         "checkpoint_sha256": "c"}) for b in bundles]
    (root / INDEX).write_text("\n".join(lines) + "\n")
    return root / INDEX


@pytest.fixture(scope="module")
def history(built_bundle) -> dict:
    return json.loads((built_bundle / "golden.json").read_text())["cases"][0]["history"]


# --- the manifest: tamper-evidence, plain file names, extra files, binding to the program ---


def test_edited_user_id_fails_verify_on_its_own(built_bundle, tmp_path):
    bundle = copy_of(built_bundle, tmp_path)
    edit_manifest(bundle, lambda m: m.__setitem__("user_id", m["user_id"] + 1))
    line = one_line_failure(*cli("verify", str(bundle))[::2])
    assert "golden.json" in line and "history of user" in line


def test_any_manifest_edit_fails_verify_with_the_index(built_bundle, tmp_path):
    """An item id no golden case uses replays fine, so only the recorded digest can catch it."""
    root = tmp_path / "out"
    bundle = copy_of(built_bundle, root, "ab")
    index = index_for(root, [bundle])
    assert cli("verify", "--index", str(index))[0] == 0
    golden = json.loads((bundle / "golden.json").read_text())
    used = {c for case in golden["cases"] for c in case["candidates"]}
    used |= {e["item_id"] for case in golden["cases"] for e in case["history"]["events"]}
    ids = shard_ids(json.loads((bundle / "manifest.json").read_text())["items"])
    unused = max(k for k in range(len(ids) - 1) if ids[k] not in used and ids[k] + 1 < ids[k + 1])
    edit_manifest(bundle, lambda m: edit_shard_ids(m["items"], lambda ids: ids.__setitem__(unused, ids[unused] + 1)))
    assert cli("verify", str(bundle))[0] == 0  # the id is in no golden case: the replay cannot see it
    code, out, err = cli("verify", "--index", str(index))
    assert code == 1 and "sha256 differs from the one" in err and "FAILED" in err


def test_signature_is_an_hmac_of_the_manifest_and_verify_checks_it(built_bundle, tmp_path):
    key_file = tmp_path / "app.key"
    key_file.write_bytes(os.urandom(32))
    bundle = copy_of(built_bundle, tmp_path)
    sign_bundle(bundle, key_file.read_bytes())
    # What an app computes with its platform's HMAC-SHA256 (here: openssl) over the manifest's bytes.
    if shutil.which("openssl"):
        mac = subprocess.run(["openssl", "dgst", "-sha256", "-mac", "HMAC", "-macopt", f"hexkey:{key_file.read_bytes().hex()}",
                              str(bundle / "manifest.json")], capture_output=True, text=True, check=True).stdout
        assert mac.split()[-1] == (bundle / SIGNATURE).read_text().strip()
    assert cli("verify", str(bundle), "--key", str(key_file))[0] == 0

    other_key = tmp_path / "other.key"
    other_key.write_bytes(os.urandom(32))
    assert "under this key" in one_line_failure(*cli("verify", str(bundle), "--key", str(other_key))[::2])
    edit_manifest(bundle, lambda m: edit_shard_ids(m["items"], lambda ids: ids.__setitem__(-1, ids[-1] + 1)))
    assert "under this key" in one_line_failure(*cli("verify", str(bundle), "--key", str(key_file))[::2])
    (bundle / SIGNATURE).unlink()
    assert "not signed" in one_line_failure(*cli("verify", str(bundle), "--key", str(key_file))[::2])
    short = tmp_path / "short.key"
    short.write_bytes(b"secret")
    assert "at least 32" in one_line_failure(*cli("verify", str(bundle), "--key", str(short))[::2])


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", ".hidden", "a/b"])
def test_manifest_files_are_plain_names_in_the_bundle(built_bundle, tmp_path, name):
    bundle = copy_of(built_bundle, tmp_path)
    digest = hashlib.sha256(b"x").hexdigest()
    edit_manifest(bundle, lambda m: m["files"].__setitem__(name, digest))
    line = one_line_failure(*cli("verify", str(bundle))[::2])
    assert "files" in line and "manifest.json" in line


def test_files_pattern_is_in_the_generated_schema():
    from sdk_builder.formats import PLAIN_FILE_NAME, Manifest

    files = Manifest.model_json_schema()["properties"]["files"]
    assert files["propertyNames"]["pattern"] == PLAIN_FILE_NAME and files["additionalProperties"] is False


def test_unexpected_files_in_a_bundle_are_flagged(built_bundle, tmp_path):
    bundle = copy_of(built_bundle, tmp_path)
    (bundle / "payload.so").write_bytes(b"\x7fELF")
    assert "payload.so" in one_line_failure(*cli("verify", str(bundle))[::2])


def test_more_items_than_the_program_holds_fails(built_bundle, tmp_path):
    bundle = copy_of(built_bundle, tmp_path)
    edit_manifest(bundle, lambda m: edit_shard_ids(m["items"], lambda ids: ids.append(ids[-1] + 1)))
    edit_manifest(bundle, lambda m: m["shard_policy"].__setitem__("shard_size", len(shard_ids(m["items"]))))
    assert "shard_policy.sources add up to" in one_line_failure(*cli("verify", str(bundle))[::2])
    edit_manifest(bundle, lambda m: m["shard_policy"].__setitem__("shard_size", len(shard_ids(m["items"])) - 1))
    assert "room for shard_policy.shard_size" in one_line_failure(*cli("verify", str(bundle))[::2])


@pytest.mark.parametrize("table", ["items", "categories"])
def test_broken_id_encodings_fail_in_one_line_naming_the_file_and_field(built_bundle, tmp_path, table):
    bundle = copy_of(built_bundle, tmp_path)
    for broken, reason in BROKEN_IDS.items():
        edit_manifest(bundle, lambda m: m[table].__setitem__("ids", broken))
        line = one_line_failure(*cli("verify", str(bundle))[::2])
        assert f"manifest.json: {table}.ids: " in line and reason in line, line
    edit_manifest(bundle, lambda m: m[table].__setitem__("ids", [1, 2]))  # the JSON list of format_version 2
    assert f"{table}.ids: " in one_line_failure(*cli("verify", str(bundle))[::2])
    assert cli("inspect", str(bundle))[0] == 0  # inspect sizes a manifest it cannot use


@settings(max_examples=300, deadline=None, derandomize=True)
@given(ids=st.lists(st.integers(0, INT64_MAX), max_size=40, unique=True).map(sorted))
def test_id_encoding_round_trips_and_agrees_with_the_unit_by_unit_decoder(ids):
    text = encode_ids(ids)
    assert decode_ids(text) == ids == shard_ids({"ids": text})
    units = sum(1 + (d >= 2**23) + (d >= 2**46) for d in (b - a for a, b in zip([0] + ids, ids)))
    assert len(text) == 4 * units and "=" not in text  # whole units: 4 characters each, never padded


@settings(max_examples=200, deadline=None, derandomize=True)
@given(ids=st.lists(st.integers(0, 2**40), min_size=1, max_size=60, unique=True).map(sorted),
       new=st.integers(0, 2**40))
def test_an_id_entering_the_shard_rewrites_only_the_text_next_to_it(ids, new):
    """Delta patches copy what did not move: the text before the new id's units and after its
    successor's (the only difference that changes) must be the old text's, whatever the sizes."""
    if new in ids:
        return
    before, after = encode_ids(ids), encode_ids(sorted(ids + [new]))
    prefix = len(os.path.commonprefix([before, after]))
    suffix = len(os.path.commonprefix([before[::-1], after[::-1]]))
    assert len(after) - min(prefix + suffix, len(before)) <= 4 * 3 * 2  # at most 2 values of at most 3 units


@settings(max_examples=300, deadline=None, derandomize=True)
@given(data=st.binary(max_size=40))
def test_any_id_string_decodes_to_sorted_int64_ids_or_a_one_line_error(data):
    import base64

    whole_units = base64.b64encode(data[: len(data) // 3 * 3]).decode()
    for text in (whole_units, base64.b64encode(data).decode(), data.decode("latin-1")):
        try:
            ids = decode_ids(text)
        except ValueError as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        assert ids == sorted(set(ids)) and all(0 <= i <= INT64_MAX for i in ids) and decode_ids(encode_ids(ids)) == ids


def test_golden_scores_are_written_in_float32s_shortest_digits():
    """Fewer bytes, same float32 values: what a client narrows each score to is the program's own."""
    import numpy as np

    from sdk_builder.formats import GoldenSet

    scores = np.array([0.1, 0.008161816745996475, 1 / 3, 1e-12, 0.0, 1.0], np.float32)
    golden = GoldenSet.model_validate({"tolerance": 1e-5, "cases": [
        {"name": "c", "history": {"user_id": 1, "events": []}, "request_time": 0, "candidates": [1] * 6,
         "scores": scores.tolist()}]})
    text = golden.to_json()
    assert '"scores":[0.1,0.008161817,0.33333334,1e-12,0.0,1.0]' in text, text
    again = GoldenSet.model_validate_json(text)
    assert np.array_equal(np.asarray(again.cases[0].scores, np.float32), scores) and again.to_json() == text


def test_max_history_must_be_the_programs(built_bundle, tmp_path, history):
    bundle = copy_of(built_bundle, tmp_path)
    edit_manifest(bundle, lambda m: m["program"].__setitem__("max_history", 5))
    assert "max_history 5" in one_line_failure(*cli("verify", str(bundle))[::2])
    events = tmp_path / "h.json"
    events.write_text(json.dumps(history))
    assert "max_history 5" in one_line_failure(*cli("rank", str(bundle), "--events", str(events), "--candidates", "1")[::2])


def test_binary_golden_with_a_matching_hash_is_one_line(built_bundle, tmp_path):
    bundle = copy_of(built_bundle, tmp_path)
    (bundle / "golden.json").write_bytes(bytes(range(256)) * 8)
    rehash(bundle, "golden.json")
    assert "golden.json" in one_line_failure(*cli("verify", str(bundle))[::2])


# --- many bundles in one call ---


def test_verify_many_reports_each_failure_on_one_line(built_bundle, tmp_path):
    root = tmp_path / "out"
    good = [copy_of(built_bundle, root / "x", str(k)) for k in range(2)]
    bad = copy_of(built_bundle, root / "y", "bad")
    (bad / "golden.json").write_bytes(b"{}")
    index = index_for(root, [*good, bad])
    code, out, err = cli("verify", str(root), "--json")
    report = json.loads(out)
    assert code == 1 and report["summary"] == {**report["summary"], "bundles": 3, "ok": 2, "failed": 1}
    assert [r["bundle"] for r in report["bundles"] if not r["ok"]] == [str(bad)]
    code, out, err = cli("verify", "--index", str(index))
    failures = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(failures) == 1 and failures[0].startswith(f"FAILED {bad / 'golden.json'}")
    assert out.count("\nOK ") + out.startswith("OK ") == 2 and "2 of 3 bundles OK" in out


# --- rank: hostile requests ---


@pytest.mark.parametrize("args, needle", [
    (["--candidates", "9223372036854775808"], "candidates"),
    (["--candidates", "\u00b2"], "candidates"),
    (["--candidates", "1", "--request-time", "99999999999999999999"], "--request-time"),
    (["--candidates", "1,2,3", "--top", "-1"], "--top"),
])
def test_rank_rejects_out_of_range_numbers(built_bundle, tmp_path, history, args, needle):
    events = tmp_path / "h.json"
    events.write_text(json.dumps(history))
    assert needle in one_line_failure(*cli("rank", str(built_bundle), "--events", str(events), *args)[::2])


@pytest.mark.parametrize("item_id", [2**70, "12", 1.0, True, -1])
def test_rank_uses_the_schemas_rules_for_ids(built_bundle, tmp_path, history, item_id):
    events = tmp_path / "h.json"
    doc = json.loads(json.dumps(history))
    doc["events"][0]["item_id"] = item_id
    events.write_text(json.dumps(doc))
    line = one_line_failure(*cli("rank", str(built_bundle), "--events", str(events), "--candidates", "1")[::2])
    assert "events.0.item_id" in line and str(events) in line


def test_rank_of_a_binary_events_file_is_one_line(built_bundle, tmp_path):
    events = tmp_path / "h.bin"
    events.write_bytes(bytes(range(256)))
    assert str(events) in one_line_failure(*cli("rank", str(built_bundle), "--events", str(events), "--candidates", "1")[::2])


def test_rank_top_keeps_the_best(built_bundle, tmp_path, history):
    events = tmp_path / "h.json"
    events.write_text(json.dumps(history))
    ids = shard_ids(json.loads((built_bundle / "manifest.json").read_text())["items"])[:3]
    code, out, _ = cli("rank", str(built_bundle), "--events", str(events), "--candidates", ",".join(map(str, ids)), "--json")
    full = json.loads(out)["ranked"]
    code, out, _ = cli("rank", str(built_bundle), "--events", str(events), "--candidates", ",".join(map(str, ids)),
                       "--top", "2", "--json")
    assert code == 0 and json.loads(out)["ranked"] == full[:2]


# --- the history parser under arbitrary input ---

FUZZ_EXAMPLES = 400
_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**80, max_value=2**80),
                       st.floats(allow_nan=False), st.text(max_size=8), st.sampled_from(["pv", "buy", "cart", "fav"]))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                     max_leaves=20)
_event = st.fixed_dictionaries({"item_id": _json_leaf | st.integers(0, INT64_MAX), "category_id": st.integers(0, INT64_MAX),
                                "behavior": st.sampled_from(["pv", "buy", "cart", "fav", "x"]),
                                "timestamp": st.integers(0, INT64_MAX) | _json_leaf})
_history = st.fixed_dictionaries({"user_id": st.integers(-1, INT64_MAX + 1), "events": st.lists(_event, max_size=22)})
_valid_event = st.fixed_dictionaries({"item_id": st.integers(0, INT64_MAX), "category_id": st.integers(0, INT64_MAX),
                                      "behavior": st.sampled_from(["pv", "buy", "cart", "fav"]),
                                      "timestamp": st.integers(0, 2**40)})
_valid_history = st.fixed_dictionaries({"user_id": st.integers(0, INT64_MAX), "events": st.lists(_valid_event, max_size=20)}).map(
    lambda h: {**h, "events": sorted(h["events"], key=lambda e: e["timestamp"])})
_text = st.one_of(_json.map(json.dumps), _history.map(json.dumps), _valid_history.map(json.dumps),
                  _history.map(json.dumps).map(lambda t: t[: len(t) // 2]),  # truncated files
                  st.binary(max_size=64), st.text(max_size=64))
FUZZ_SEEN: dict[str, int] = {"examples": 0, "results": 0, "errors": 0}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=_text, candidates=st.lists(st.integers(-1, INT64_MAX + 1), min_size=0, max_size=5),
       request_time=st.integers(-1, INT64_MAX + 1))
def test_history_parser_gives_a_result_or_one_line_error(fuzz_manifest, text, candidates, request_time):
    FUZZ_SEEN["examples"] += 1
    try:
        history = parse_history(text, "h.json")
        request = encode(fuzz_manifest, history, request_time, candidates)
    except BundleError as exc:
        assert "\n" not in str(exc) and str(exc)
        FUZZ_SEEN["errors"] += 1
        return
    FUZZ_SEEN["results"] += 1
    assert request.hist_items.shape == (fuzz_manifest.program.max_history,) and len(request.candidates) == len(candidates)


@pytest.fixture(scope="module")
def fuzz_manifest(built_bundle):
    return read_manifest(built_bundle)


def test_fuzz_tried_every_example():
    """Runs after the fuzz test: prints how many inputs it tried (and that none raised another exception)."""
    if FUZZ_SEEN["examples"] == 0:
        pytest.skip("run together with test_history_parser_gives_a_result_or_one_line_error")
    print(f"fuzz: {FUZZ_SEEN}")
    assert FUZZ_SEEN["results"] + FUZZ_SEEN["errors"] == FUZZ_SEEN["examples"] >= FUZZ_EXAMPLES


# --- the index on a full disk, the free-space message ---


def test_full_disk_while_writing_the_index_leaves_no_temp_and_says_what_is_written(tmp_path, monkeypatch):
    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode and INDEX in str(path):
            def write(_data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            f.write = write
        return f

    monkeypatch.setattr("builtins.open", full_disk_open)
    with pytest.raises(BundleError) as caught:
        write_index(tmp_path, [{"user_id": 1, "path": "a/b/1", "manifest_sha256": "0" * 64, "skipped": False}], "c")
    message = str(caught.value)
    assert "disk full" in message and "bundle(s) of this run are written" in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("free, n, needed_text, noun", [(0, 1, "240 KB", "1 bundle needs"),
                                                         (5_000_000, 1000, "240 MB", "1,000 bundles need")])
def test_free_space_message_has_units_and_grammar(tmp_path, monkeypatch, free, n, needed_text, noun):
    monkeypatch.setattr(store.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    with pytest.raises(BundleError) as caught:
        check_output(tmp_path, n, 200_000)
    assert f"{noun} about {needed_text}" in str(caught.value) and ("0 B free" in str(caught.value)) == (free == 0)


# --- start-up: the phone-side commands never load the exporter ---

PROBE = """
import sys
from sdk_builder.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    print("LOADED:" + ",".join(sorted(m for m in sys.modules if m.startswith(("executorch.exir", "torch._dynamo", "torchao", "pandas")))))
"""


@pytest.mark.parametrize("command", ["rank", "verify", "inspect"])
def test_command_paths_do_not_import_the_exporter(built_bundle, tmp_path, history, command):
    events = tmp_path / "h.json"
    events.write_text(json.dumps(history))
    args = {"rank": ["rank", str(built_bundle), "--events", str(events), "--candidates", "1,2"],
            "verify": ["verify", str(built_bundle)], "inspect": ["inspect", str(built_bundle)]}[command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = result.stdout.rsplit("LOADED:", 1)[1].strip()
    assert loaded == "", f"{command} imported {loaded[:300]}"
