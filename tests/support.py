"""What the client tests share: the on-device input mapping written once in Python (the contract
the templates are held to), the Python ExecuTorch runtime's scores, harder requests than the golden
ones, and installing the Debian packages a test needs."""

from __future__ import annotations

import bisect
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdk_builder.formats import encode_ids

REPO = Path(__file__).resolve().parents[1]
INPUT_ORDER = ("hist_items", "hist_categories", "hist_behaviors", "hist_timestamps", "request_time", "candidates",
               "user_state")
INT64_INPUTS = INPUT_ORDER[:6]  # user_state is float32
# Downloaded tools (e.g. the Kotlin compiler) are kept across runs here, never in the repository.
TOOL_CACHE = Path(tempfile.gettempdir()) / "tbsm-sdk-test-tools"


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


BASE64_ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # RFC 4648


def shard_ids(shard: dict[str, Any]) -> list[int]:
    """The ids of a manifest's `items` / `categories` (base64 id units, formats.IDS_ENCODING), decoded
    unit by unit straight off the characters here, apart from sdk_builder.formats, as the reference of
    the clients' (a big-endian 3-byte unit is exactly 4 base64 characters, the first the most significant)."""
    text = shard["ids"]
    assert len(text) % 4 == 0, "a truncated unit"
    ids, value, shift = [], 0, 0
    for start in range(0, len(text), 4):
        unit = 0
        for char in text[start : start + 4]:
            unit = unit << 6 | BASE64_ALPHABET.index(char)
        value |= (unit & 0x7FFFFF) << shift
        shift += 23
        if not unit & 0x800000:
            ids.append(value + (ids[-1] if ids else 0))
            value, shift = 0, 0
    assert shift == 0, "the last value is truncated"
    return ids


# Manifest id strings every client must refuse, each with a word of the one-line reason (the Kotlin and
# Swift unit tests list the same ones; tests/test_template_contract.py checks that they do).
BROKEN_IDS = {
    "AAA!": "not base64", "AAA=": "not base64", "AAAAAA": "truncated unit", "gAAA": "truncated value",
    "AAABAAAA": "repeats", "gAAAgAAAgAAAAAAA": "more than 3 units", "////////AgAA": "exceeds int64",
    "////////Af//AAAB": "exceeds int64",
}


def edit_shard_ids(shard: dict[str, Any], edit: Callable[[list[int]], Any]) -> None:
    """Apply `edit` to the decoded ids of a manifest table in place, and store them encoded again."""
    ids = shard_ids(shard)
    edit(ids)
    shard["ids"] = encode_ids(ids)


def local_row(shard: dict[str, Any], global_id: int) -> int:
    """Binary search in the shard's sorted ids: ids[i] -> i + first_row, absent -> oov_row."""
    ids = shard_ids(shard)
    i = bisect.bisect_left(ids, global_id)
    if i < len(ids) and ids[i] == global_id:
        return i + shard["first_row"]
    return shard["oov_row"]


def reference_inputs(manifest: dict[str, Any], history: dict[str, Any], request_time: int,
                     candidates: list[int], user_state: list[float] | None = None) -> dict[str, list]:
    """The seven input tensors of model.pte, as lists, for one request (the shipped user state unless
    `user_state` is given)."""
    t = manifest["program"]["max_history"]
    events = history.get("events", [])[-t:]  # "events" may be absent: the schema's default is []
    pad = t - len(events)
    items, cats = manifest["items"], manifest["categories"]
    return {
        "hist_items": [items["padding_row"]] * pad + [local_row(items, e["item_id"]) for e in events],
        "hist_categories": [cats["padding_row"]] * pad + [local_row(cats, e["category_id"]) for e in events],
        "hist_behaviors": [0] * pad + [manifest["behaviors"][e["behavior"]] for e in events],
        "hist_timestamps": [0] * pad + [e["timestamp"] for e in events],
        "request_time": [request_time],
        "candidates": [local_row(items, c) for c in candidates],
        # float32, as the program takes it (the manifest writes float32's shortest digits)
        "user_state": np.asarray(manifest["user_state"] if user_state is None else user_state, np.float32).tolist(),
    }


def reference_refresh_events(manifest: dict[str, Any], history: dict[str, Any]) -> dict[str, list[int]]:
    """Inputs 1-4 of refresh.pte: the last refresh.events (max_history + window) events, encoded like the history."""
    width = manifest["refresh"]["events"]
    wide = dict(manifest, program=dict(manifest["program"], max_history=width))
    inputs = reference_inputs(wide, history, 0, [], [])
    return {f"events_{name}": inputs[f"hist_{name}"] for name in ("items", "categories", "behaviors", "timestamps")}


_METHODS: dict[str, Any] = {}


def python_scores(bundle: Path, inputs: dict[str, list[int]]) -> list[float]:
    """Scores of the bundle's model.pte through the Python ExecuTorch runtime (this process)."""
    import torch

    from sdk_builder.runtime import load_runtime_method

    path = str(bundle / "model.pte")
    if path not in _METHODS:
        _METHODS[path] = load_runtime_method(path)
    out = _METHODS[path].execute(input_tensors([inputs[name] for name in INPUT_ORDER]))
    return [float(x) for x in out[0].tolist()]


def input_tensors(values: list[list]) -> list:
    """The program's input tensors from lists in INPUT_ORDER: six int64, then float32 user_state."""
    import torch

    return [torch.tensor(v, dtype=torch.int64) for v in values[:6]] + [torch.tensor(values[6], dtype=torch.float32)]


_SINGLE_THREAD_SCRIPT = """
import json, sys
from executorch.extension.pybindings import _C
_C._unsafe_reset_threadpool(1)  # before any method exists: the native client runs on one thread too
from sdk_builder.runtime import load_runtime_method
from tests.support import input_tensors
methods, out = {}, []
for path, tensors in json.load(sys.stdin):
    if path not in methods:
        methods[path] = load_runtime_method(path)
    result = methods[path].execute(input_tensors(tensors))
    out.append([float(x) for x in result[0].tolist()])
json.dump(out, sys.stdout)
"""


def python_scores_one_thread(requests: list[tuple[Path, dict[str, list[int]]]]) -> list[list[float]]:
    """Like `python_scores`, in a fresh process whose ExecuTorch thread pool has one thread.

    The thread count changes how XNNPACK splits reductions (differences ~1e-7); resetting the pool
    in this process could pull it from under methods other tests already loaded, hence a subprocess.
    """
    payload = json.dumps([[str(b / "model.pte"), [inputs[k] for k in INPUT_ORDER]] for b, inputs in requests])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _SINGLE_THREAD_SCRIPT], input=payload, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def extra_cases(manifest: dict, golden: dict) -> dict:
    """Harder requests than the golden ones: a history longer than max_history, ids outside the shard,
    ids next to shard boundaries, every behaviour, equal timestamps. Scores are placeholders."""
    items, cats = shard_ids(manifest["items"]), shard_ids(manifest["categories"])
    behaviors = sorted(manifest["behaviors"])
    user = manifest["user_id"]
    t = manifest["program"]["max_history"]
    base = 1_600_000_000
    long_events = [
        {
            "item_id": items[(7 * k) % len(items)] if k % 3 else items[-1] + 1 + k,
            "category_id": cats[(5 * k) % len(cats)] if k % 4 else 2**40 + k,
            "behavior": behaviors[k % len(behaviors)],
            "timestamp": base + 60 * (k // 2),
        }
        for k in range(t + 11)
    ]
    edge_ids = [items[0], items[-1], max(items[0] - 1, 0), items[-1] + 1, 0, 2**40, items[len(items) // 2]]
    edge_ids += [i + 1 for i in items[:5]] + items[-5:]
    cases = [
        {"name": "longer_than_max_history", "history": {"user_id": user, "events": long_events},
         "request_time": base + 10_000, "candidates": edge_ids},
        {"name": "exactly_max_history", "history": {"user_id": user, "events": long_events[-t:]},
         "request_time": base + 10_000, "candidates": items[:3]},
        {"name": "single_candidate_oov", "history": {"user_id": user, "events": long_events[:2]},
         "request_time": base, "candidates": [items[-1] + 12345]},
        {"name": "no_events_key", "history": {"user_id": user}, "request_time": base, "candidates": items[-2:]},
    ]
    for case in cases:
        case["scores"] = [0.0] * len(case["candidates"])
    return {"tolerance": golden["tolerance"], "cases": cases}


def ensure_debian_packages(packages: dict[str, Callable[[], bool]]) -> None:
    """Installs the Debian packages whose probe fails with apt-get; fails (never skips) when it cannot."""
    missing = sorted(name for name, present in packages.items() if not present())
    if not missing:
        return
    apt = shutil.which("apt-get")
    assert apt is not None and os.geteuid() == 0, f"{missing} are missing and apt-get is not usable (run as root)"
    install = [apt, "install", "-y", "--no-install-recommends", *missing]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run = dict(capture_output=True, text=True, env=env, timeout=900, stdin=subprocess.DEVNULL)
    if subprocess.run(install, **run).returncode != 0:
        subprocess.run([apt, "update"], **run)
        proc = subprocess.run(install, **run)
        assert proc.returncode == 0, f"apt-get install {' '.join(missing)} failed:\n{proc.stderr[-3000:]}"
    still = sorted(name for name, present in packages.items() if not present())
    assert not still, f"installed {missing} but {still} are still not usable"
