"""Per-user bundles: slicing parity, the real .pte in the ExecuTorch runtime, bad input, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from jsonschema import Draft202012Validator

from sdk_builder.bundle.build import BundleBuilder
from sdk_builder.bundle.golden import ShardView
from sdk_builder.bundle.store import parse_user_id, write_bundle_atomically
from sdk_builder.bundle.verify import verify_bundle
from sdk_builder.client import Bundle, encode, parse_history
from sdk_builder.formats import BundleError
from sdk_builder.program import UserProgram
from sdk_builder.formats import EventHistory, events_json_schema
from tests.support import shard_ids

CLI = [sys.executable, "-m", "sdk_builder.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def test_sliced_program_matches_full_model_in_eager(builder):
    """Random histories over shard and unknown ids, short and empty ones: sliced == full model."""
    user_id = int(builder.ckpt.users.ids[11])
    shard, _ = builder.shard_for(builder.user_row(user_id))
    program = UserProgram.for_shard(builder.model, shard, builder.ckpt.item_category).eval()
    shard_ids = builder.ckpt.items.global_id(shard.item_rows)
    cat_ids = builder.ckpt.categories.global_id(shard.category_rows)
    rng = np.random.default_rng(0)
    from sdk_builder.formats import Event

    worst = 0.0
    for length in (0, 1, 5, 19, 20, 20):
        stamps = np.sort(rng.integers(1_511_000_000, 1_512_000_000, length))
        events = [Event(item_id=int(rng.choice(shard_ids)) if rng.random() < 0.8 else 10**9 + k,
                        category_id=int(rng.choice(cat_ids)), behavior="pv", timestamp=int(t))
                  for k, t in enumerate(stamps)]
        history = EventHistory(user_id=user_id, events=events)
        candidates = [int(x) for x in rng.choice(shard_ids, 30)] + [10**9 + 99]
        request = encode(ShardView(builder.ckpt, shard), history, 1_512_100_000, candidates)
        with torch.no_grad():
            sliced = program(*request.tensors()).numpy()
        full = builder.eager_scores(shard, history, 1_512_100_000, candidates)
        worst = max(worst, float(np.abs(sliced - full).max()))
    assert worst <= 1e-6


def test_bundle_verifies_in_the_runtime(built_bundle):
    report = verify_bundle(built_bundle)
    assert report["ok"] and report["cases"] == 5 and report["max_abs_diff"] <= 1e-5
    names = {c.name for c in Bundle(built_bundle).golden().cases}
    assert names == {"full_history", "short_history", "empty_history", "all_oov_history", "new_events_history"}


def test_xnnpack_bundle_verifies_through_the_cli(builder, tmp_path):
    user_id = str(int(builder.ckpt.users.ids[2]))
    run_dir = builder.ckpt.path.parent
    result = run_cli("build", str(run_dir), "--user-shard", user_id, "--out", str(tmp_path), "--shard-size", "300", "--json")
    assert result.returncode == 0, result.stderr
    built = json.loads(result.stdout)["bundles"][0]
    assert built["max_golden_diff"] <= 1e-5
    verified = run_cli("verify", built["path"], "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["summary"]["ok"] == 1 and report["bundles"][0]["max_abs_diff"] <= 1e-5


def test_same_inputs_give_byte_identical_bundles(builder, tmp_path):
    user_id = int(builder.ckpt.users.ids[5])
    a = builder.build(user_id, tmp_path / "a").path
    b = builder.build(user_id, tmp_path / "b").path
    for name in ("model.pte", "manifest.json", "golden.json", "events.schema.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="portable", seed=1).build(user_id, tmp_path / "c").path
    assert (other / "golden.json").read_bytes() != (a / "golden.json").read_bytes()  # the seed matters


def test_bundle_holds_no_other_users_embedding_row(built_bundle, builder):
    """The user's row is the manifest's `user_state` (a program input); no user row is in the program."""
    program = (built_bundle / "model.pte").read_bytes()
    table = builder.model.tower.user_emb.weight.detach().numpy()
    manifest = json.loads((built_bundle / "manifest.json").read_text())
    own = builder.user_row(manifest["user_id"])
    state = np.asarray(manifest["user_state"], dtype=np.float32)
    assert state[: table.shape[1]].tobytes() == table[own].tobytes()
    leaks = [row for row in range(len(table)) if table[row].tobytes() in program]
    assert leaks == []


def test_manifest_lists_sorted_shard_and_hashes(built_bundle):
    manifest = json.loads((built_bundle / "manifest.json").read_text())
    ids = shard_ids(manifest["items"])
    assert ids == sorted(set(ids))
    assert len(ids) <= 300
    assert set(manifest["files"]) == {"model.pte", "events.schema.json", "golden.json"}
    assert manifest["seeds"]["bundle"] == 0 and "torch" in manifest["versions"] and "executorch" in manifest["versions"]
    assert [i["name"] for i in manifest["program"]["inputs"]] == [
        "hist_items", "hist_categories", "hist_behaviors", "hist_timestamps", "request_time", "candidates", "user_state"]


def test_schema_is_generated_and_agrees_with_the_parser(built_bundle):
    schema = json.loads((built_bundle / "events.schema.json").read_text())
    assert schema == events_json_schema()
    validator = Draft202012Validator(schema)
    good = {"user_id": 1, "events": [{"item_id": 3, "category_id": 4, "behavior": "buy", "timestamp": 10}]}
    bad_behavior = {"user_id": 1, "events": [{"item_id": 3, "category_id": 4, "behavior": "click", "timestamp": 10}]}
    too_many = {"user_id": 1, "events": [good["events"][0]] * 21}
    assert validator.is_valid(good) and not validator.is_valid(bad_behavior) and not validator.is_valid(too_many)
    for doc in (bad_behavior, too_many):
        with pytest.raises(BundleError):
            parse_history(json.dumps(doc))


@pytest.mark.parametrize(
    "events, needle",
    [
        ([{"item_id": "x", "category_id": 1, "behavior": "pv", "timestamp": 1}], "events.0.item_id"),
        ([{"item_id": 1, "category_id": 1, "behavior": "like", "timestamp": 1}], "events.0.behavior"),
        ([{"item_id": 1, "category_id": 1, "behavior": "pv", "timestamp": 5},
          {"item_id": 2, "category_id": 1, "behavior": "pv", "timestamp": 4}], "earlier than"),
        ([{"item_id": 1, "category_id": 1, "behavior": "pv", "timestamp": t} for t in range(21)], "events"),
        ([{"item_id": 1, "category_id": 1, "behavior": "pv"}], "events.0.timestamp"),
    ],
)
def test_rank_rejects_bad_histories_with_one_line(built_bundle, tmp_path, events, needle):
    user_id = json.loads((built_bundle / "manifest.json").read_text())["user_id"]
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"user_id": user_id, "events": events}))
    result = run_cli("rank", str(built_bundle), "--events", str(f), "--candidates", "1,2")
    assert result.returncode != 0
    message = last_line(result.stderr)
    assert needle in message and str(f) in message


def test_rank_empty_and_all_oov_histories_and_bad_candidates(built_bundle, tmp_path):
    manifest = json.loads((built_bundle / "manifest.json").read_text())
    user_id, ids = manifest["user_id"], shard_ids(manifest["items"])
    f = tmp_path / "h.json"
    f.write_text(json.dumps({"user_id": user_id, "events": []}))
    candidates = ",".join(map(str, ids[:5] + [10**12]))
    ok = run_cli("rank", str(built_bundle), "--events", str(f), "--candidates", candidates, "--request-time", "1512000000", "--json")
    assert ok.returncode == 0, ok.stderr
    ranked = json.loads(ok.stdout)["ranked"]
    assert len(ranked) == 6 and [r["score"] for r in ranked] == sorted((r["score"] for r in ranked), reverse=True)
    assert {r["item_id"]: r["in_shard"] for r in ranked}[10**12] is False

    f.write_text(json.dumps({"user_id": user_id, "events": [
        {"item_id": 10**12 + k, "category_id": 10**12, "behavior": "pv", "timestamp": 1_511_000_000 + k} for k in range(5)]}))
    assert run_cli("rank", str(built_bundle), "--events", str(f), "--candidates", candidates).returncode == 0

    for bad, needle in (("", "candidates"), (",".join(["1"] * 4097), "4097"), ("1,x", "'x'")):
        result = run_cli("rank", str(built_bundle), "--events", str(f), "--candidates", bad)
        assert result.returncode != 0 and needle in last_line(result.stderr)

    f.write_text(json.dumps({"user_id": user_id + 1, "events": []}))
    wrong_user = run_cli("rank", str(built_bundle), "--events", str(f), "--candidates", "1")
    assert wrong_user.returncode != 0 and "this bundle is for user" in last_line(wrong_user.stderr)


def test_verify_detects_corruption(built_bundle, tmp_path):
    for name, mutate in (
        ("model.pte", lambda b: b[:1000] + bytes([b[1000] ^ 0xFF]) + b[1001:]),
        ("golden.json", lambda b: b.replace(b'"scores":[', b'"scores":[0.5,', 1)),
    ):
        copy = tmp_path / name.replace(".", "_")
        shutil.copytree(built_bundle, copy)
        (copy / name).write_bytes(mutate((copy / name).read_bytes()))
        result = run_cli("verify", str(copy))
        assert result.returncode != 0 and "sha256" in last_line(result.stderr) and name in last_line(result.stderr)

    copy = tmp_path / "version"
    shutil.copytree(built_bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("verify", str(copy))
    assert result.returncode != 0 and "format_version 99" in last_line(result.stderr)
    assert run_cli("verify", str(tmp_path / "missing")).returncode != 0


def test_golden_mismatch_is_caught_even_with_consistent_hashes(built_bundle, tmp_path):
    """A tampered golden file with a re-computed hash still fails: the runtime replay decides."""
    import hashlib

    copy = tmp_path / "regolden"
    shutil.copytree(built_bundle, copy)
    golden = json.loads((copy / "golden.json").read_text())
    golden["cases"][0]["scores"][0] += 1e-3
    (copy / "golden.json").write_text(json.dumps(golden))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["golden.json"] = hashlib.sha256((copy / "golden.json").read_bytes()).hexdigest()
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="golden vectors differ"):
        verify_bundle(copy)


def test_build_rejects_unknown_and_unsafe_user_ids(trained_run, tmp_path):
    unknown = run_cli("build", str(trained_run), "--user-shard", "999999999", "--out", str(tmp_path))
    assert unknown.returncode != 0 and "999999999" in last_line(unknown.stderr)
    unsafe = run_cli("build", str(trained_run), "--user-shard", "../etc", "--out", str(tmp_path))
    assert unsafe.returncode != 0 and "'../etc'" in last_line(unsafe.stderr)
    assert not any(tmp_path.iterdir())
    with pytest.raises(BundleError):
        parse_user_id("12/3")


def test_interrupted_write_leaves_no_partial_bundle(tmp_path):
    final = tmp_path / "42"
    with pytest.raises(TypeError):
        write_bundle_atomically(final, {"model.pte": b"abc", "manifest.json": None})  # fails on the 2nd file
    assert list(tmp_path.iterdir()) == []
    write_bundle_atomically(final, {"model.pte": b"old"})
    with pytest.raises(TypeError):
        write_bundle_atomically(final, {"model.pte": b"new", "manifest.json": None})
    assert (final / "model.pte").read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["42"]


def test_categories_over_capacity_map_to_oov_on_both_sides(builder, tmp_path):
    """A bundle that cannot carry all its items' categories scores them as unknown, and its golden
    vectors (eager full model) agree with the program in the runtime."""
    small = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="portable", category_capacity=3)
    user_id = int(builder.ckpt.users.ids[9])
    path = small.build(user_id, tmp_path).path
    manifest = json.loads((path / "manifest.json").read_text())
    assert len(shard_ids(manifest["categories"])) == 3 and manifest["shard_policy"]["sources"]["categories_over_capacity"] > 0
    assert verify_bundle(path)["max_abs_diff"] <= 1e-5
