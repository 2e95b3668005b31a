"""The C++ reference client (mobile_templates/native) against the Python ExecuTorch runtime.

The client is built with CMake into build/native/<hash>/ (skipped without cmake or a compiler), test
bundles are made once into build/test-bundles/ (both cached by a hash of their sources), and every
golden case is replayed through the client, the Python runtime and the expected scores: the client
must match the one-thread Python runtime bit for bit, the default runtime within 1e-6, and golden.json
within its tolerance.

Bundles: `sdk_builder.bundle.build_demo_bundles` (three users exported with the xnnpack recipe, one
with the portable recipe) plus a toy int8 bundle whose item table goes through
quantized_decomposed::embedding_byte (the quantized kernels). Without the real builder, toy fp32 and
int8 bundles with the exact input signature of the contract stand in (`build_toy_bundle`). The
helpers (`bundle_dirs`, `reference_inputs`, `python_scores`) are shared with the other template tests.
"""

from __future__ import annotations

import bisect
import hashlib
import importlib
import inspect
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "build"
NATIVE_SRC = REPO / "mobile_templates" / "native"
PYTHON = sys.executable

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sdk_builder import formats  # noqa: E402
from sdk_builder.export import program_spec  # noqa: E402

# --------------------------------------------------------------------------------------------------
# Reference mapping (the contract, written once in Python)
# --------------------------------------------------------------------------------------------------


def local_row(shard: dict[str, Any], global_id: int) -> int:
    """Binary search in the shard's sorted ids: ids[i] -> i + first_row, absent -> oov_row."""
    ids = shard["ids"]
    i = bisect.bisect_left(ids, global_id)
    if i < len(ids) and ids[i] == global_id:
        return i + shard["first_row"]
    return shard["oov_row"]


def reference_inputs(
    manifest: dict[str, Any], history: dict[str, Any], request_time: int, candidates: list[int]
) -> dict[str, list[int]]:
    """The six input tensors of model.pte, as lists, for one request."""
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
    }


INPUT_ORDER = ("hist_items", "hist_categories", "hist_behaviors", "hist_timestamps", "request_time", "candidates")


def python_scores(bundle: Path, inputs: dict[str, list[int]]) -> list[float]:
    """Scores of the bundle's model.pte through the Python ExecuTorch runtime."""
    import torch

    method = _python_method(str(bundle / "model.pte"))
    out = method.execute([torch.tensor(inputs[name], dtype=torch.int64) for name in INPUT_ORDER])
    return [float(x) for x in out[0].tolist()]


_METHODS: dict[str, Any] = {}

_SINGLE_THREAD_SCRIPT = """
import json, sys
from executorch.extension.pybindings import _C
_C._unsafe_reset_threadpool(1)  # before any method exists: the native client runs on one thread too
import executorch.kernels.quantized
import torch
from executorch.runtime import Runtime
methods, out = {}, []
for path, tensors in json.load(sys.stdin):
    if path not in methods:
        methods[path] = Runtime.get().load_program(path).load_method("forward")
    result = methods[path].execute([torch.tensor(t, dtype=torch.int64) for t in tensors])
    out.append([float(x) for x in result[0].tolist()])
json.dump(out, sys.stdout)
"""


def python_scores_one_thread(requests: list[tuple[Path, dict[str, list[int]]]]) -> list[list[float]]:
    """Like `python_scores`, in a fresh process whose ExecuTorch thread pool has one thread.

    The thread count changes how XNNPACK splits reductions (differences ~1e-7); resetting the pool
    in this process could pull it from under methods other tests already loaded, hence a subprocess.
    """
    payload = json.dumps([[str(b / "model.pte"), [inputs[k] for k in INPUT_ORDER]] for b, inputs in requests])
    proc = subprocess.run([PYTHON, "-c", _SINGLE_THREAD_SCRIPT], input=payload, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _python_method(path: str) -> Any:
    if path not in _METHODS:
        import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed kernels)
        from executorch.runtime import Runtime

        _METHODS[path] = Runtime.get().load_program(path).load_method("forward")
    return _METHODS[path]


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------
# Test bundles: the lead's real builder when present, else a toy model with the same signature
# --------------------------------------------------------------------------------------------------


def _real_builder():
    try:
        mod = importlib.import_module("sdk_builder.bundle")
    except ImportError:
        return None, None
    fn = getattr(mod, "build_demo_bundles", None)
    return (fn, Path(mod.__file__)) if callable(fn) else (None, None)


def _tree_hash(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for q in files:
            if "__pycache__" in q.parts:
                continue
            h.update(str(q.relative_to(REPO)).encode())
            h.update(q.read_bytes())
    return h.hexdigest()[:16]


def prune_stale(parent: Path, keep: Path, prefix: str = "") -> None:
    """Removes older cache entries next to `keep` (same prefix), so build/ does not grow forever."""
    for old in parent.glob(f"{prefix}*"):
        if old != keep and old.is_dir() and not old.name.startswith("tmp-"):
            shutil.rmtree(old, ignore_errors=True)


def _cached_bundles(kind: str, key: str, build) -> list[Path]:
    """`build(tmp_dir) -> [bundle dirs]`, run once per key; later calls reuse build/test-bundles/<kind>-<key>/."""
    root = BUILD / "test-bundles" / f"{kind}-{key}"
    done = root / "DONE"
    if not done.exists():
        (BUILD / "test-bundles").mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"tmp-{kind}-", dir=BUILD / "test-bundles"))
        dirs = [Path(d) for d in build(tmp)]
        (tmp / "DONE").write_text("\n".join(str(d.relative_to(tmp)) for d in dirs) + "\n")
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
        prune_stale(root.parent, root, f"{kind}-")
    return [root / name for name in done.read_text().split()]


def bundle_dirs() -> list[Path]:
    """Bundles to test against, built once per source state and cached under build/test-bundles/.

    With the real builder (`sdk_builder.bundle.build_demo_bundles`): three users exported with the
    xnnpack recipe and one with the portable recipe, plus the toy int8 bundle (the only one that
    exercises the quantized kernels). Without it: the toy fp32 and int8 bundles.
    """
    import executorch.version
    import torch

    versions = f"torch={torch.__version__} executorch={executorch.version.__version__}"
    generator = (build_toy_bundles, build_toy_bundle, _export, _toy_manifest, _toy_golden)
    toy_key = _tree_hash([REPO / "sdk_builder" / "formats.py"],
                         versions + "".join(inspect.getsource(f) for f in (*generator, reference_inputs, local_row)))
    toy = _cached_bundles("toy", toy_key, build_toy_bundles)
    builder, builder_file = _real_builder()
    if builder is None:
        return toy
    real_key = _tree_hash([builder_file.parent, REPO / "model"], versions + " xnnpack:3 portable:1")

    def build_real(tmp: Path) -> list[Path]:
        real = [Path(p) for p in builder(tmp / "xnnpack", n_users=3)]
        return real + [_portable_bundle(tmp, builder)]

    return _cached_bundles("real", real_key, build_real) + [b for b in toy if b.name.endswith("int8")]


def _portable_bundle(tmp: Path, builder) -> Path:
    """One user with the portable recipe, from the model build_demo_bundles just trained (training
    again costs ~50 s); through the public function if the builder's internals have moved."""
    try:
        from sdk_builder.bundle import BundleBuilder
        from sdk_builder.data.dataset import PreparedData
        from sdk_builder.runs import DATA, load_checkpoint

        run = tmp / "xnnpack" / "run"
        ckpt = load_checkpoint(run)
        portable = BundleBuilder(ckpt, PreparedData.load(run / DATA), recipe="portable", seed=0)
        return Path(portable.build(int(ckpt.users.ids[0]), tmp / "portable" / "bundles").path)
    except (ImportError, AttributeError, TypeError, FileNotFoundError):
        return Path(builder(tmp / "portable", n_users=1, recipe="portable")[0])


def build_toy_bundles(out_dir: Path) -> list[Path]:
    return [
        build_toy_bundle(out_dir / "toy-user-7", user_id=7, seed=1, quantized=False),
        build_toy_bundle(out_dir / "toy-user-42-int8", user_id=42, seed=2, quantized=True),
    ]


def build_toy_bundle(out: Path, *, user_id: int, seed: int, quantized: bool) -> Path:
    """A bundle whose model.pte has the contract's exact signature, with a small random model.

    Not a trained model: it only has to use every input (rows, categories, behaviours, timestamps,
    request time, a dynamic number of candidates) so a wrong input moves the scores.
    """
    import random

    import torch
    from torch import nn

    rng = random.Random(seed)
    torch.manual_seed(seed)
    item_ids = sorted(rng.sample(range(1000, 100_000), 300))
    cat_ids = sorted(rng.sample(range(1, 5_000), 40))
    item_cat = {i: rng.choice(cat_ids) for i in item_ids}
    n_items, n_cats, dim = len(item_ids) + formats.FIRST_REAL_ROW, len(cat_ids) + formats.FIRST_REAL_ROW, 16
    # Category row of every item row (padding and OOV items map to the padding / OOV category).
    item_cat_rows = [formats.PADDING_ROW, formats.OOV_ROW] + [
        cat_ids.index(item_cat[i]) + formats.FIRST_REAL_ROW for i in item_ids
    ]

    class ToyRanker(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            item_w = torch.randn(n_items, dim) * 0.5
            item_w[0] = 0
            if quantized:
                scales = item_w.abs().amax(dim=1).clamp(min=1e-6) / 127.0
                self.register_buffer("item_q", torch.round(item_w / scales[:, None]).to(torch.int8))
                self.register_buffer("item_scales", scales)
            else:
                self.item = nn.Embedding(n_items, dim, _weight=item_w)
            self.cat = nn.Embedding(n_cats, dim)
            self.beh = nn.Embedding(5, dim)
            self.time = nn.Linear(1, dim)
            self.register_buffer("item_category", torch.tensor(item_cat_rows, dtype=torch.int64))
            self.head = nn.Sequential(nn.Linear(3 * dim, 32), nn.ReLU(), nn.Linear(32, 1))

        def item_vec(self, rows: torch.Tensor) -> torch.Tensor:
            if quantized:
                return torch.ops.quantized_decomposed.embedding_byte.default(
                    self.item_q, self.item_scales, None, -128, 127, rows
                )
            return self.item(rows)

        def forward(self, hist_items, hist_categories, hist_behaviors, hist_timestamps, request_time, candidates):
            mask = (hist_items != formats.PADDING_ROW).to(torch.float32).unsqueeze(-1)  # [T, 1]
            seconds = (request_time - hist_timestamps).clamp(min=0).to(torch.float32)  # [T]
            dt = torch.log1p(seconds / 60.0).unsqueeze(-1) / 10.0
            h = self.item_vec(hist_items) + self.cat(hist_categories) + self.beh(hist_behaviors) + self.time(dt)
            h = h * mask  # [T, D]
            c = self.item_vec(candidates) + self.cat(self.item_category[candidates])  # [N, D]
            att = torch.sigmoid(torch.bmm(c.unsqueeze(0), h.t().unsqueeze(0)).squeeze(0)) * mask.t()  # [N, T]
            ctx = torch.bmm(att.unsqueeze(0), h.unsqueeze(0)).squeeze(0) / float(formats.MAX_HISTORY)
            logit = self.head(torch.cat([c, ctx, c * ctx], dim=-1)).squeeze(-1)
            return torch.sigmoid(logit)

    if quantized:
        import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)

    model = ToyRanker().eval()
    manifest = _toy_manifest(user_id, seed, item_ids, cat_ids, quantized, n_items, n_cats, dim)
    golden = _toy_golden(model, manifest, user_id, rng, item_ids, item_cat)
    out.mkdir(parents=True)
    (out / "model.pte").write_bytes(_export(model))
    (out / "events.schema.json").write_text(json.dumps(formats.events_json_schema(), indent=1) + "\n")
    (out / "golden.json").write_text(golden.to_json())
    manifest.files = {
        name: hashlib.sha256((out / name).read_bytes()).hexdigest()
        for name in ("model.pte", "events.schema.json", "golden.json")
    }
    (out / "manifest.json").write_text(manifest.to_json())
    return out


def _export(model) -> bytes:
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    t = formats.MAX_HISTORY
    example = (
        torch.zeros(t, dtype=torch.int64),
        torch.zeros(t, dtype=torch.int64),
        torch.zeros(t, dtype=torch.int64),
        torch.zeros(t, dtype=torch.int64),
        torch.tensor([1_700_000_000], dtype=torch.int64),
        torch.tensor([2, 3, 4], dtype=torch.int64),
    )
    n = torch.export.Dim("n_candidates", min=1, max=formats.MAX_CANDIDATES)
    shapes = (None, None, None, None, None, {0: n})
    ep = torch.export.export(model, example, dynamic_shapes=shapes)
    return to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer


def _toy_manifest(user_id, seed, item_ids, cat_ids, quantized, n_items, n_cats, dim) -> formats.Manifest:
    import executorch.version
    import torch

    return formats.Manifest(
        versions={"torch": torch.__version__, "executorch": executorch.version.__version__},
        user_id=user_id,
        recipe="toy-int8" if quantized else "toy-fp32",
        checkpoint_sha256="0" * 64,
        model_config={"toy": True, "num_items": n_items, "num_categories": n_cats, "emb_dim": dim},
        program=program_spec(),
        items=formats.IdShard(ids=item_ids),
        categories=formats.IdShard(ids=cat_ids),
        shard_policy=formats.ShardPolicy(name="toy", shard_size=len(item_ids), weights={}, sources={}),
        seeds={"toy": seed},
        golden_tolerance=1e-5,
        files={},
    )


def _toy_golden(model, manifest, user_id, rng, item_ids, item_cat) -> formats.GoldenSet:
    import torch

    behaviors = [b.value for b in formats.Behavior]
    oov_items = [7, 999_999_999]  # ids outside the shard
    now = 1_700_000_000
    manifest_dict = manifest.model_dump(by_alias=True, mode="json")

    def history(n: int, *, oov: bool = False, same_time: bool = False) -> formats.EventHistory:
        events, ts = [], now - 86_400 * 3
        for k in range(n):
            item = rng.choice(item_ids)
            cat = item_cat[item]
            if oov and k % 4 == 1:
                item = rng.choice(oov_items)
            if oov and k % 5 == 2:
                cat = 123_456_789
            ts += 0 if same_time else rng.randint(1, 7_200)
            events.append(formats.Event(item_id=item, category_id=cat, behavior=rng.choice(behaviors), timestamp=ts))
        return formats.EventHistory(user_id=user_id, events=events)

    specs = [
        ("empty_history", history(0), 5),
        ("one_event", history(1), 1),
        ("short_history", history(7), 50),
        ("full_history", history(20), 300),
        ("oov_ids", history(20, oov=True), 40),
        ("same_timestamps", history(12, same_time=True), 10),
    ]
    cases = []
    for name, hist, n_cand in specs:
        candidates = rng.sample(item_ids, min(n_cand, len(item_ids)))
        if name == "oov_ids":
            candidates[:2] = oov_items
        request_time = (hist.events[-1].timestamp if hist.events else now) + rng.randint(0, 3_600)
        inputs = reference_inputs(manifest_dict, hist.model_dump(mode="json"), request_time, candidates)
        with torch.no_grad():
            scores = model(*(torch.tensor(inputs[k], dtype=torch.int64) for k in INPUT_ORDER))
        cases.append(
            formats.GoldenCase(
                name=name,
                history=hist,
                request_time=request_time,
                candidates=candidates,
                scores=[float(s) for s in scores.tolist()],
            )
        )
    return formats.GoldenSet(tolerance=manifest.golden_tolerance, cases=cases)


# --------------------------------------------------------------------------------------------------
# Building the native client
# --------------------------------------------------------------------------------------------------


def executorch_prefix() -> Path:
    """The installed executorch package directory (CMAKE_PREFIX_PATH of its CMake package)."""
    import executorch.version

    return Path(executorch.version.__file__).resolve().parent


def native_client() -> Path:
    """Configure and build mobile_templates/native into build/native/<hash>/, once per source state."""
    cmake = shutil.which("cmake")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cmake is None or cxx is None:
        pytest.skip("cmake or a C++ compiler is missing: the native client cannot be built here")
    prefix = executorch_prefix()
    if not (prefix / "share" / "cmake" / "executorch-config.cmake").exists():
        pytest.skip("this executorch wheel ships no CMake package (no C++ runtime)")
    key = _tree_hash([NATIVE_SRC], f"{prefix} {cmake} {cxx}")
    build_dir = BUILD / "native" / key
    exe = build_dir / "tbsm_rank"
    if exe.exists():
        return exe
    build_dir.mkdir(parents=True, exist_ok=True)
    configure = [
        cmake, "-S", str(NATIVE_SRC), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
        f"-DCMAKE_PREFIX_PATH={prefix}", f"-DCMAKE_CXX_COMPILER={cxx}",
    ]
    for cmd in (configure, [cmake, "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    assert exe.exists(), f"the build produced no {exe}"
    prune_stale(build_dir.parent, build_dir)
    return exe


def run_client(exe: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"tbsm_rank {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundles() -> list[Path]:
    return bundle_dirs()


@pytest.fixture(scope="module")
def client() -> Path:
    return native_client()


def test_bundles_follow_the_contract(bundles):
    for bundle in bundles:
        manifest = formats.Manifest.model_validate(load_json(bundle / "manifest.json"))
        assert manifest.format_version == formats.BUNDLE_FORMAT_VERSION
        names = {p.name for p in bundle.iterdir() if p.is_file()} - {"manifest.json"}
        assert set(manifest.files) == names
        for name, digest in manifest.files.items():
            assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
        assert [s.name for s in manifest.program.inputs] == list(INPUT_ORDER)
        assert load_json(bundle / "events.schema.json") == formats.events_json_schema()
        formats.GoldenSet.model_validate(load_json(bundle / "golden.json"))


def test_reference_mapping_agrees_with_the_sdk_client(bundles):
    """The mapping these tests hold the templates to is the SDK's own (sdk_builder.client.encode)."""
    client = pytest.importorskip("sdk_builder.client")
    if not hasattr(client, "encode"):
        pytest.skip("sdk_builder.client has no encode()")
    for bundle in bundles:
        manifest = formats.Manifest.model_validate(load_json(bundle / "manifest.json"))
        golden = formats.GoldenSet.model_validate(load_json(bundle / "golden.json"))
        for case in golden.cases:
            sdk = client.encode(manifest, case.history, case.request_time, case.candidates)
            ours = reference_inputs(manifest.model_dump(by_alias=True, mode="json"), case.history.model_dump(mode="json"),
                                    case.request_time, case.candidates)
            for name in INPUT_ORDER:
                assert getattr(sdk, name).tolist() == ours[name], (bundle, case.name, name)


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


def test_native_accepts_a_history_without_events(bundles, client, tmp_path):
    bundle = bundles[0]
    manifest = load_json(bundle / "manifest.json")
    history = {"user_id": manifest["user_id"]}  # valid: "events" defaults to []
    (tmp_path / "h.json").write_text(json.dumps(history))
    candidates = manifest["items"]["ids"][:3]
    proc = run_client(client, str(bundle), "--events", str(tmp_path / "h.json"),
                      "--candidates", ",".join(map(str, candidates)), "--request-time", "1700000000")
    expected = python_scores(bundle, reference_inputs(manifest, history, 1_700_000_000, candidates))
    got = {r["item_id"]: r["score"] for r in json_lines(proc.stdout)}
    assert all(abs(got[c] - s) <= 1e-6 for c, s in zip(candidates, expected))


def test_native_rejects_unordered_history(bundles, client, tmp_path):
    bundle = bundles[0]
    golden = load_json(bundle / "golden.json")
    case = next(c for c in golden["cases"] if len(c["history"]["events"]) >= 3)
    history = dict(case["history"], events=list(reversed(case["history"]["events"])))
    if history["events"][0]["timestamp"] == history["events"][-1]["timestamp"]:
        pytest.skip("case has equal timestamps")
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
