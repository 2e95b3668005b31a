"""Per-user bundles: build (shard -> slice -> compile -> golden vectors -> atomic write) and verify.

A bundle directory holds `model.pte`, `manifest.json`, `events.schema.json` and `golden.json`.
It is written under a temporary name next to its final place and renamed, so readers see either
no bundle or a whole one. Same checkpoint, data, user, policy and seed give identical bytes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jsonschema import Draft202012Validator

from model.tbsm import OOV_ROW, PADDING_ROW, RESERVED_ROWS
from sdk_builder.client import (
    GOLDEN, MANIFEST, PROGRAM, SCHEMA, Bundle, BundleError, encode, sha256_bytes,
)
from sdk_builder.dataset import PreparedData
from sdk_builder.export import Shard, compile_program, load_runtime_method, program_spec
from sdk_builder.formats import (
    BEHAVIOR_CODES, MAX_HISTORY, Event, EventHistory, GoldenCase, GoldenSet, IdShard, Manifest,
    ShardPolicy as ShardPolicyModel, events_json_schema,
)
from sdk_builder.shard import ShardIndex, ShardPolicy
from sdk_builder.training import LoadedCheckpoint, versions

GOLDEN_TOLERANCE = 1e-5
GOLDEN_CANDIDATES = 16
_SAFE_USER_ID = re.compile(r"^[0-9]{1,19}$")
_BEHAVIOR_NAMES = {code: name for name, code in BEHAVIOR_CODES.items()}


def parse_user_id(text: str) -> int:
    """User ids name bundle directories: only plain non-negative integers are accepted."""
    if not _SAFE_USER_ID.match(str(text)):
        raise BundleError(f"user id {text!r} is not a non-negative integer (bundle directories are named by user id)")
    return int(text)


@dataclass
class BuildResult:
    user_id: int
    path: Path
    bytes_program: int
    bytes_total: int
    seconds: float
    max_golden_diff: float


class BundleBuilder:
    """Builds bundles from one checkpoint and the data it was trained on."""

    def __init__(self, ckpt: LoadedCheckpoint, data: PreparedData, policy: ShardPolicy | None = None,
                 recipe: str = "xnnpack", seed: int = 0) -> None:
        if data.fingerprint() != ckpt.payload["data_fingerprint"]:
            raise BundleError("the data does not match the checkpoint's data fingerprint")
        self.ckpt, self.data, self.recipe, self.seed = ckpt, data, recipe, seed
        self.policy = policy or ShardPolicy()
        self.index = ShardIndex(data, self.policy)
        self.model = ckpt.model.eval()

    # -- one user -------------------------------------------------------------------------------
    def user_row(self, user_id: int) -> int:
        row = int(self.ckpt.users.lookup(np.array([user_id]), unknown=-1)[0])
        if row < 0:
            raise BundleError(f"unknown user id {user_id}: not in the checkpoint's training data")
        return row

    def shard_for(self, user_row: int) -> tuple[Shard, dict[str, int]]:
        sl = self.data.user_events(user_row)
        items, cats = self.data.item_rows[sl], self.data.cat_rows[sl]
        item_rows, sources = self.index.select(items, cats)
        # Categories of the shard items and of the history events (an event may carry another one).
        category_rows = np.union1d(self.data.item_category[item_rows], cats[-MAX_HISTORY:])
        category_rows = category_rows[category_rows >= RESERVED_ROWS]
        return Shard(user_row, item_rows, category_rows), sources

    def manifest_for(self, user_id: int, shard: Shard, sources: dict[str, int], files: dict[str, str]) -> Manifest:
        return Manifest(
            versions=versions(), user_id=user_id, recipe=self.recipe, checkpoint_sha256=self.ckpt.sha256,
            model_config=self.ckpt.config.to_dict(), program=program_spec(),
            items=IdShard(ids=self.ckpt.items.global_id(shard.item_rows).tolist()),
            categories=IdShard(ids=self.ckpt.categories.global_id(shard.category_rows).tolist()),
            shard_policy=ShardPolicyModel(name=self.policy.name, shard_size=self.policy.shard_size,
                                          weights=self.policy.weights, sources=sources),
            seeds={"train": int(self.ckpt.payload.get("seed", 0)), "bundle": self.seed},
            golden_tolerance=GOLDEN_TOLERANCE, files=files,
        )

    def golden_cases(self, user_id: int, shard: Shard) -> list[GoldenCase]:
        """Real histories of the user (full, short, empty, all-OOV) with shard and unknown candidates."""
        data = self.data
        sl = data.user_events(shard.user_row)
        events = [
            Event(item_id=int(i), category_id=int(c), behavior=_BEHAVIOR_NAMES[int(b)], timestamp=int(t))
            for i, c, b, t in zip(self.ckpt.items.global_id(data.item_rows[sl][-MAX_HISTORY:]),
                                  self.ckpt.categories.global_id(data.cat_rows[sl][-MAX_HISTORY:]),
                                  data.behaviors[sl][-MAX_HISTORY:], data.timestamps[sl][-MAX_HISTORY:])
        ]
        last_time = events[-1].timestamp if events else 0
        rng = np.random.default_rng([self.seed, user_id])
        shard_ids = self.ckpt.items.global_id(shard.item_rows)
        picks = np.sort(rng.choice(len(shard_ids), min(GOLDEN_CANDIDATES, len(shard_ids)), replace=False))
        unknown_id = int(self.ckpt.items.ids.max()) + 1 + int(rng.integers(0, 1000))
        candidates = [int(x) for x in shard_ids[picks]] + [unknown_id]
        foreign = [e.model_copy(update={"item_id": unknown_id + 1 + k}) for k, e in enumerate(events[-5:])]
        histories = {
            "full_history": events,
            "short_history": events[-3:],
            "empty_history": [],
            "all_oov_history": foreign,
        }
        cases = []
        for name, hist in histories.items():
            history = EventHistory(user_id=user_id, events=hist)
            request_time = last_time + 3600
            scores = self.eager_scores(shard, history, request_time, candidates)
            cases.append(GoldenCase(name=name, history=history, request_time=request_time,
                                    candidates=candidates, scores=[float(s) for s in scores]))
        return cases

    def eager_scores(self, shard: Shard, history: EventHistory, request_time: int, candidate_ids) -> np.ndarray:
        """The full eager model on the same request, ids outside the shard mapped to the OOV row."""
        manifest_like = _ShardManifest(self.ckpt, shard)
        req = encode(manifest_like, history, request_time, candidate_ids)
        full_item = np.concatenate([[PADDING_ROW, OOV_ROW], shard.item_rows])
        full_cat = np.concatenate([[PADDING_ROW, OOV_ROW], shard.category_rows])
        n = len(req.candidates)
        cand_full = full_item[req.candidates]
        cand_cat = np.where(cand_full >= RESERVED_ROWS, self.ckpt.item_category[cand_full], OOV_ROW)
        items = np.tile(np.append(full_item[req.hist_items], 0), (n, 1))
        cats = np.tile(np.append(full_cat[req.hist_categories], 0), (n, 1))
        items[:, -1], cats[:, -1] = cand_full, cand_cat
        behaviors = np.tile(np.append(req.hist_behaviors, 0), (n, 1))
        stamps = np.tile(np.append(req.hist_timestamps, request_time), (n, 1))
        with torch.no_grad():
            return self.model.score(torch.full((n,), shard.user_row), torch.from_numpy(items), torch.from_numpy(cats),
                                    torch.from_numpy(behaviors), torch.from_numpy(stamps)).numpy().astype(np.float64)

    def build(self, user_id: int, out_root: Path) -> BuildResult:
        started = time.perf_counter()
        shard, sources = self.shard_for(self.user_row(user_id))
        program = compile_program(self.model, shard, self.ckpt.item_category, self.recipe)
        cases = self.golden_cases(user_id, shard)
        golden = GoldenSet(tolerance=GOLDEN_TOLERANCE, cases=cases)
        files = {
            PROGRAM: program,
            SCHEMA: (json.dumps(events_json_schema(), indent=2, sort_keys=True) + "\n").encode(),
            GOLDEN: golden.to_json().encode(),
        }
        manifest = self.manifest_for(user_id, shard, sources, {k: sha256_bytes(v) for k, v in sorted(files.items())})
        files[MANIFEST] = manifest.to_json().encode()
        max_diff = replay_golden(manifest, golden, load_runtime_method(program))
        if max_diff > GOLDEN_TOLERANCE:
            raise BundleError(f"user {user_id}: the compiled program differs from the eager model by {max_diff:.2e} "
                              f"(> {GOLDEN_TOLERANCE:g}); not writing the bundle")
        path = write_bundle_atomically(Path(out_root) / str(user_id), files)
        return BuildResult(user_id, path, len(program), sum(len(v) for v in files.values()),
                           time.perf_counter() - started, max_diff)


class _ShardManifest:
    """The parts of a manifest `encode` needs, before the manifest itself exists."""

    def __init__(self, ckpt: LoadedCheckpoint, shard: Shard) -> None:
        self.items = IdShard(ids=ckpt.items.global_id(shard.item_rows).tolist())
        self.categories = IdShard(ids=ckpt.categories.global_id(shard.category_rows).tolist())
        self.behaviors = dict(BEHAVIOR_CODES)
        self.program = program_spec()


def replay_golden(manifest: Manifest, golden: GoldenSet, method) -> float:
    worst = 0.0
    for case in golden.cases:
        request = encode(manifest, case.history, case.request_time, case.candidates)
        got = method.execute(request.tensors())[0].numpy().astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - np.asarray(case.scores)))))
    return worst


def write_bundle_atomically(final: Path, files: dict[str, bytes]) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        if final.exists():
            # A directory cannot be replaced in one rename: move the old one aside first, so a
            # crash leaves either the old or the new bundle at `final`, plus a stale temp dir.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def verify_bundle(path: Path) -> dict:
    """Hashes, manifest, schema and golden vectors replayed in the ExecuTorch runtime."""
    bundle = Bundle(Path(path))
    m = bundle.manifest
    expected = {PROGRAM, SCHEMA, GOLDEN}
    missing = expected - set(m.files)
    if missing:
        raise BundleError(f"{bundle.path / MANIFEST}: files: {sorted(missing)} not listed")
    if m.items.ids != sorted(set(m.items.ids)) or m.categories.ids != sorted(set(m.categories.ids)):
        raise BundleError(f"{bundle.path / MANIFEST}: items.ids / categories.ids must be sorted and unique")
    try:
        schema = json.loads((bundle.path / SCHEMA).read_text())
        Draft202012Validator.check_schema(schema)
    except Exception as exc:
        raise BundleError(f"{bundle.path / SCHEMA}: not a valid JSON Schema ({type(exc).__name__})") from None
    validator = Draft202012Validator(schema)
    golden = bundle.golden()
    for case in golden.cases:
        errors = list(validator.iter_errors(case.history.model_dump(mode="json")))
        if errors:
            raise BundleError(f"{bundle.path / GOLDEN}: case {case.name}: history fails the schema: {errors[0].message}")
    worst = replay_golden(m, golden, bundle.method)
    if worst > golden.tolerance:
        raise BundleError(f"{bundle.path}: golden vectors differ by {worst:.2e} > tolerance {golden.tolerance:g}")
    return {"bundle": str(bundle.path), "user_id": m.user_id, "ok": True, "cases": len(golden.cases),
            "max_abs_diff": worst, "items": len(m.items.ids), "categories": len(m.categories.ids),
            "bytes": {name: (bundle.path / name).stat().st_size for name in sorted(expected | {MANIFEST})}}


def build_demo_bundles(out_dir: Path, n_users: int = 3, recipe: str = "xnnpack", seed: int = 0) -> list[Path]:
    """Train a small model on synthetic data and build `n_users` real bundles (for samples and tests)."""
    from model.tbsm import TBSMConfig
    from model.train import TrainConfig
    from sdk_builder.dataset import prepare
    from sdk_builder.synthetic import generate_taobao_events
    from sdk_builder.training import DATA, load_checkpoint, train_run

    out_dir = Path(out_dir)
    run = out_dir / "run"
    data = prepare(generate_taobao_events(300, n_items=3000, n_categories=40, seed=seed), seed=seed)
    train_run(data, run, TBSMConfig(**data.table_sizes()), TrainConfig(epochs=1, seed=seed), force=True)
    ckpt = load_checkpoint(run)
    builder = BundleBuilder(ckpt, PreparedData.load(run / DATA), recipe=recipe, seed=seed)
    return [builder.build(int(u), out_dir / "bundles").path for u in ckpt.users.ids[:n_users]]
