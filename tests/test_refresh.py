"""On-device refresh of the user state: the training program's gradient in the real runtime, the
client loop (deterministic, bounded, reset), its effect on the ranking, and the bundle around it."""

from __future__ import annotations

import json
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from sdk_builder.bundle.build import BundleBuilder
from sdk_builder.bundle.golden import ShardView
from sdk_builder.bundle.verify import verify_bundle
from sdk_builder.client import Bundle, padded_events
from sdk_builder.formats import BUNDLE_FORMAT_VERSION, BundleError, Event, EventHistory, Manifest
from sdk_builder.refresh import REFRESH_FILE, RefreshConfig, eager_gradient
from sdk_builder.runtime import load_runtime_method
from sdk_builder.util import sha256_bytes

CLI = [sys.executable, "-m", "sdk_builder.cli"]
USER_INDEX = 7  # the user of `built_bundle`


@pytest.fixture(scope="module")
def refresh_builder(builder):
    """The session builder's ranking template (same recipe and layout), plus a refresh template."""
    refreshing = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="portable", refresh=RefreshConfig())
    refreshing.template = builder.template
    refreshing.prepare_refresh()
    return refreshing


@pytest.fixture(scope="module")
def refresh_bundle(refresh_builder, tmp_path_factory):
    user_id = int(refresh_builder.ckpt.users.ids[USER_INDEX])
    return refresh_builder.build(user_id, tmp_path_factory.mktemp("refresh-bundles")).path


def test_refresh_program_gradient_matches_eager_autograd(refresh_builder):
    """The stamped program in the runtime (plain method and TrainingModule) vs eager autograd, on a
    moved state and events with padding, unknown items and repeats."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer

    b, config = refresh_builder, refresh_builder.refresh
    shard, _ = b.shard_for(b.user_row(int(b.ckpt.users.ids[3])))
    view = ShardView(b.ckpt, shard)
    rng = np.random.default_rng(5)
    ids = view.items.ids
    events = [Event(item_id=int(rng.choice(ids)) if k % 4 else 10**12 + k, category_id=int(rng.choice(view.categories.ids)),
                    behavior=("pv", "buy", "cart", "fav")[k % 4], timestamp=1_511_000_000 + 600 * k)
              for k in range(config.events - 7)]
    events[-1] = events[-3]  # a repeated positive
    state = view.user_state + rng.normal(0, 0.1, view.user_state.shape).astype(np.float32)
    inputs = [torch.from_numpy(state), *(torch.from_numpy(a) for a in padded_events(view, events, config.events))]
    program = b.refresh_program_for(shard)
    loss, gradient = eager_gradient(b.model, b.refresh_constants_for(shard), config, inputs)
    assert np.abs(gradient).max() > 1e-4  # the events do move the state

    out = load_runtime_method(program).execute(inputs)
    assert out[0].shape == (1,) and out[1].shape == state.shape
    assert abs(float(out[0][0]) - loss) <= 1e-5
    assert np.abs(out[1].numpy() - gradient).max() <= 1e-5

    training = _load_for_executorch_for_training_from_buffer(program)
    [trained_loss] = training.forward_backward("forward", inputs)
    assert abs(float(trained_loss[0]) - loss) <= 1e-5
    assert np.abs(training.named_gradients()["delta"].numpy() - gradient).max() <= 1e-5


def test_golden_refresh_cases_are_the_shipped_programs_loop_bit_for_bit(refresh_bundle):
    """The expected states are what refresh.pte itself gives (every client runs that program), not
    an eager loop: five large steps can turn a 1e-7 gradient difference into 2e-2 when a ReLU flips
    on one side only, so an eager expectation would refuse such users' bundles."""
    bundle = Bundle(refresh_bundle)
    method = load_runtime_method((refresh_bundle / REFRESH_FILE).read_bytes())
    from sdk_builder.client import refresh_inputs, refresh_state

    for case in bundle.golden().refresh_cases:
        inputs = refresh_inputs(bundle.manifest, case.events)
        state = refresh_state(case.state_before, bundle.manifest.user_state, bundle.manifest.refresh,
                              lambda s: method.execute([torch.from_numpy(s), *inputs])[1].numpy())
        assert np.asarray(case.state_after, np.float32).tobytes() == state.tobytes(), case.name


def user_events(bundle: Bundle, n: int) -> list[Event]:
    return list(bundle.golden().refresh_cases[0].events[-n:])


def test_refresh_loop_is_deterministic_bounded_and_resets_to_the_shipped_state(refresh_bundle):
    bundle = Bundle(refresh_bundle)
    record, shipped = bundle.manifest.refresh, np.asarray(bundle.manifest.user_state, np.float32)
    events = user_events(bundle, record.events)
    first = bundle.refresh(None, events)
    assert first.dtype == np.float32 and first.tobytes() == bundle.refresh(None, events).tobytes()
    assert first.tobytes() == bundle.refresh(shipped, events).tobytes()  # no state = the shipped one
    assert not np.array_equal(first, shipped)
    assert np.linalg.norm(first.astype(np.float64) - shipped) <= record.max_drift * (1 + 1e-6)
    far = shipped + np.float32(10.0)  # a state beyond max_drift comes back within it
    assert np.linalg.norm(bundle.refresh(far, events).astype(np.float64) - shipped) <= record.max_drift * (1 + 1e-6)
    again = bundle.refresh(first, events)  # refreshes chain from the persisted state, still bounded
    assert np.linalg.norm(again.astype(np.float64) - shipped) <= record.max_drift * (1 + 1e-6)
    with pytest.raises(BundleError, match="for user"):
        bundle.refresh(None, EventHistory(user_id=bundle.manifest.user_id + 1, events=[]))


def test_refresh_on_new_events_ranks_their_items_higher(refresh_bundle, refresh_builder):
    """The user starts interacting with shard items the bundle ranked low: after a refresh on those
    events the refreshed state ranks them higher than the shipped one, for the same history (the
    one before them: with them in it, the prior puts them first whatever the state)."""
    bundle = Bundle(refresh_bundle)
    manifest, ckpt = bundle.manifest, refresh_builder.ckpt
    ids = manifest.items.ids
    past = user_events(bundle, manifest.refresh.events)
    start = past[-1].timestamp
    baseline = bundle.score(EventHistory(user_id=manifest.user_id, events=past[-20:]), start + 60, ids)
    low = [ids[i] for i in np.argsort(-baseline)[-60::6]][: manifest.refresh.window]
    rows = ckpt.items.lookup(np.asarray(low))
    categories = ckpt.categories.global_id(ckpt.item_category[rows])
    new = [Event(item_id=i, category_id=int(c), behavior="pv", timestamp=start + 60 * (k + 1))
           for k, (i, c) in enumerate(zip(low, categories))]
    events = past + new
    state = bundle.refresh(None, events)
    history = EventHistory(user_id=manifest.user_id, events=past[-20:])
    request_time = new[-1].timestamp + 60

    def ranks(scores):
        out = np.empty(len(scores), int)
        out[np.argsort(-scores, kind="stable")] = np.arange(len(scores))
        return out[[ids.index(i) for i in low]]

    before = ranks(bundle.score(history, request_time, ids))
    after = ranks(bundle.score(history, request_time, ids, state))
    assert after.mean() < before.mean(), (before, after)
    assert (after <= before).sum() > len(low) // 2, (before, after)


def test_refresh_bundle_is_byte_identical_from_the_cli_and_verifies(refresh_builder, refresh_bundle, tmp_path):
    """A fresh process (its own refresh export) builds the same bytes as the session builder."""
    user_id = str(int(refresh_builder.ckpt.users.ids[USER_INDEX]))
    run_dir = refresh_builder.ckpt.path.parent
    built = subprocess.run([*CLI, "build", str(run_dir), "--user-shard", user_id, "--out", str(tmp_path), "--recipe", "portable",
                            "--shard-size", "300", "--refresh", "--json"], capture_output=True, text=True, timeout=900)
    assert built.returncode == 0, built.stderr
    path = json.loads(built.stdout)["bundles"][0]["path"]
    names = sorted(p.name for p in refresh_bundle.iterdir())
    assert REFRESH_FILE in names and sorted(p.name for p in Path(path).iterdir()) == names
    for name in names:
        assert (refresh_bundle / name).read_bytes() == (Path(path) / name).read_bytes(), name
    manifest = json.loads((refresh_bundle / "manifest.json").read_text())
    assert manifest["refresh"]["file"] == REFRESH_FILE and manifest["format_version"] == BUNDLE_FORMAT_VERSION
    verified = subprocess.run([*CLI, "verify", path, "--json"], capture_output=True, text=True, timeout=600)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["bundles"][0]["refresh_max_abs_diff"] <= 1e-5


def test_verify_fails_when_the_refresh_program_is_tampered(refresh_bundle, refresh_builder, tmp_path):
    report = verify_bundle(refresh_bundle)
    assert report["ok"] and report["refresh_max_abs_diff"] <= 1e-5
    flipped = tmp_path / "flipped"
    shutil.copytree(refresh_bundle, flipped)
    data = bytearray((flipped / REFRESH_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (flipped / REFRESH_FILE).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        verify_bundle(flipped)
    # Another user's refresh program with a consistent hash: only the replay of the refresh cases can tell.
    swapped = tmp_path / "swapped"
    shutil.copytree(refresh_bundle, swapped)
    other, _ = refresh_builder.shard_for(refresh_builder.user_row(int(refresh_builder.ckpt.users.ids[USER_INDEX + 1])))
    program = refresh_builder.refresh_program_for(other)
    (swapped / REFRESH_FILE).write_bytes(program)
    manifest = Manifest.model_validate_json((swapped / "manifest.json").read_bytes())
    manifest.files[REFRESH_FILE] = sha256_bytes(program)
    (swapped / "manifest.json").write_text(manifest.to_json())
    with pytest.raises(BundleError, match="refresh cases differ"):
        verify_bundle(swapped)
