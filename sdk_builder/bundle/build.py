"""Per-user bundles: build (shard -> slice -> compile -> golden vectors -> atomic write) and verify.

A bundle directory holds `model.pte`, `manifest.json`, `events.schema.json` and `golden.json`.
It is written under a temporary name next to its final place and renamed, so readers see either
no bundle or a whole one. Same checkpoint, data, user, policy and seed give identical bytes.
"""

from __future__ import annotations

import hashlib
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
from sdk_builder.export import Shard, SliceLayout, compile_program, load_runtime_method, program_spec, slice_constants
from sdk_builder.stamp import ProgramTemplate
from sdk_builder.formats import (
    BEHAVIOR_CODES, MAX_HISTORY, Event, EventHistory, GoldenCase, GoldenSet, IdShard, Manifest,
    ShardPolicy as ShardPolicyModel, compact_json, events_json_schema,
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
    max_golden_diff: float  # NaN when the build did not replay the golden vectors (stamped, guarded at start)
    skipped: bool = False  # already up to date
    manifest_sha256: str = ""
    recipe: str = ""  # the bundle's recipe (an int8 build that fell back to fp32 says so in `note`)
    note: str = ""  # int8 builds: measured drift vs the accuracy budget


def bundle_path(out_root: Path, user_id: int) -> Path:
    """<out>/<h0h1>/<h2h3>/<user_id>: 65,536 fan-out directories keep millions of bundles listable."""
    digest = hashlib.sha256(str(user_id).encode()).hexdigest()
    return Path(out_root) / digest[:2] / digest[2:4] / str(user_id)


class BundleBuilder:
    """Builds bundles from one checkpoint and the data it was trained on.

    With `stamping` (the default) the program is exported once (`prepare_stamping`) and each
    user's `model.pte` is the template with that user's constants written in; otherwise every
    bundle is a full `torch.export` + lowering (the slow path the stamping is checked against).
    """

    def __init__(self, ckpt: LoadedCheckpoint, data: PreparedData, policy: ShardPolicy | None = None,
                 recipe: str = "xnnpack", seed: int = 0, *, stamping: bool = True, category_capacity: int = 256,
                 verify_each: bool = True, durable: bool = False,
                 accuracy_budget: float = 0.01, on_budget_exceeded: str = "fail") -> None:
        if data.fingerprint() != ckpt.payload["data_fingerprint"]:
            raise BundleError("the data does not match the checkpoint's data fingerprint")
        self.ckpt, self.data, self.recipe, self.seed = ckpt, data, recipe, seed
        # int8 only (sdk_builder/quantize.py): max |score drift| vs fp32, and "fail" or "fp32" beyond it.
        self.accuracy_budget, self.on_budget_exceeded = accuracy_budget, on_budget_exceeded
        self.policy = policy or ShardPolicy()
        self.index = ShardIndex(data, self.policy)
        self.model = ckpt.model.eval()
        self.stamping = stamping
        self.durable = durable
        # Replaying the golden vectors in the runtime costs ~0.5 ms a bundle and is the only check
        # that the program, the stamping and the eager reference agree for *this* user.
        self.verify_each = verify_each
        self.layout = SliceLayout(self.policy.shard_size + RESERVED_ROWS,
                                  min(ckpt.categories.rows, max(category_capacity, 1) + RESERVED_ROWS))
        self.template: ProgramTemplate | None = None
        self.versions = versions()
        self.schema_bytes = compact_json(events_json_schema()).encode()
        key_material = json.dumps({"checkpoint": ckpt.sha256, "data": data.fingerprint(), "policy": self.policy.to_dict(),
                                   "recipe": recipe, "seed": seed, "layout": [self.layout.item_rows, self.layout.category_rows],
                                   "sdk": self.versions["tbsm_sdk"], "format": Manifest.model_fields["format_version"].default,
                                   **({"budget": [accuracy_budget, on_budget_exceeded]} if recipe == "int8" else {})},
                                  sort_keys=True)
        self.build_key = hashlib.sha256(key_material.encode()).hexdigest()

    def prepare_stamping(self, guard_users: int = 3) -> float:
        """Export the template once and check it: stamped vs fully exported programs of a few users
        must agree in the runtime. Returns the max abs difference seen (0 when bit-identical)."""
        if self.recipe == "int8":  # int8 tables: the quantized template and its guard
            from sdk_builder.quantize import build_int8_template as build_template
            from sdk_builder.quantize import check_int8_against_export as check_against_export
        else:
            from sdk_builder.stamp import build_template, check_against_export
        users = [int(u) for u in self.ckpt.users.ids[: max(guard_users, 1)]]
        shards = [self.shard_for(self.user_row(u))[0] for u in users]
        template = build_template(self.model, self.layout, self.recipe, shards[0], self.ckpt.item_category)
        requests = [encode(_ShardManifest(self.ckpt, shard), case.history, case.request_time, case.candidates).tensors()
                    for shard, u in zip(shards, users) for case in self.golden_requests(u, shard)]
        worst = check_against_export(template, self.model, shards, self.ckpt.item_category, requests)
        self.template = template
        return worst

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
        # Categories of the history events first (an event may carry another category than its
        # item's), then those of the shard items by how many items use them, up to the capacity.
        history_cats = np.unique(cats[-MAX_HISTORY:])
        item_cats, counts = np.unique(self.data.item_category[item_rows], return_counts=True)
        ranked = item_cats[np.lexsort((item_cats, -counts))]
        ordered = np.concatenate([history_cats, ranked[~np.isin(ranked, history_cats)]])
        ordered = ordered[ordered >= RESERVED_ROWS]
        capacity = self.layout.category_rows - RESERVED_ROWS
        sources["categories_over_capacity"] = int(max(0, len(ordered) - capacity))
        return Shard(user_row, item_rows, np.sort(ordered[:capacity])), sources

    def manifest_for(self, user_id: int, shard: Shard, sources: dict[str, int], files: dict[str, str]) -> Manifest:
        return Manifest(
            versions=self.versions, user_id=user_id, recipe=self.recipe, checkpoint_sha256=self.ckpt.sha256,
            model_config=self.ckpt.config.to_dict(), program=program_spec(),
            items=IdShard(ids=self.ckpt.items.global_id(shard.item_rows).tolist()),
            categories=IdShard(ids=self.ckpt.categories.global_id(shard.category_rows).tolist()),
            shard_policy=ShardPolicyModel(name=self.policy.name, shard_size=self.policy.shard_size,
                                          weights=self.policy.weights, sources=sources),
            seeds={"train": int(self.ckpt.payload.get("seed", 0)), "bundle": self.seed},
            golden_tolerance=GOLDEN_TOLERANCE, files=files, build_key=self.build_key,
        )

    def golden_requests(self, user_id: int, shard: Shard) -> list[GoldenCase]:
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
        histories = {"full_history": events, "short_history": events[-3:], "empty_history": [], "all_oov_history": foreign}
        return [GoldenCase(name=name, history=EventHistory(user_id=user_id, events=hist), request_time=last_time + 3600,
                           candidates=candidates, scores=[]) for name, hist in histories.items()]

    def golden_cases(self, user_id: int, shard: Shard) -> list[GoldenCase]:
        return self.golden_cases_many([(user_id, shard)])[0]

    def golden_cases_many(self, users: list[tuple[int, Shard]]) -> list[list[GoldenCase]]:
        """Golden cases of several users, scored by the eager full model in one batch."""
        per_user = [self.golden_requests(user_id, shard) for user_id, shard in users]
        requests = [(shard, c.history, c.request_time, c.candidates) for (_, shard), cases in zip(users, per_user) for c in cases]
        scores = iter(self.eager_scores_mixed(requests))
        for cases in per_user:
            for case in cases:
                case.scores = [float(x) for x in next(scores)]
        return per_user

    def eager_scores(self, shard: Shard, history: EventHistory, request_time: int, candidate_ids) -> np.ndarray:
        return self.eager_scores_mixed([(shard, history, request_time, candidate_ids)])[0]

    def eager_scores_many(self, shard: Shard, requests: list[tuple[EventHistory, int, list[int]]]) -> list[np.ndarray]:
        return self.eager_scores_mixed([(shard, *r) for r in requests])

    def eager_scores_mixed(self, requests: list[tuple[Shard, EventHistory, int, list[int]]]) -> list[np.ndarray]:
        """The full eager model on each (shard, request), in one batch; ids outside a request's
        shard map to the OOV row, as on the phone."""
        encoded = []
        for shard, history, request_time, candidate_ids in requests:
            req = encode(_ShardManifest(self.ckpt, shard), history, request_time, candidate_ids)
            full_item = np.concatenate([[PADDING_ROW, OOV_ROW], shard.item_rows])
            full_cat = np.concatenate([[PADDING_ROW, OOV_ROW], shard.category_rows])
            cand = full_item[req.candidates]
            # A candidate's category as the program sees it: OOV when the bundle does not carry it
            # (over the category capacity), exactly like an unknown id on the phone.
            cand_cat = np.where(cand >= RESERVED_ROWS, self.ckpt.item_category[cand], OOV_ROW)
            cand_cat = np.where(np.isin(cand_cat, shard.category_rows), cand_cat, OOV_ROW)
            encoded.append((shard.user_row, full_item[req.hist_items], full_cat[req.hist_categories], req.hist_behaviors,
                            req.hist_timestamps, request_time, cand, cand_cat))
        width = max(len(e[6]) for e in encoded)
        pad = lambda a, fill: np.pad(a, (0, width - len(a)), constant_values=fill)  # noqa: E731
        columns = list(zip(*encoded))
        tensors = [torch.from_numpy(np.asarray(columns[i], dtype=np.int64)) for i in range(6)]
        cand_items = torch.from_numpy(np.stack([pad(a, OOV_ROW) for a in columns[6]]))
        cand_cats = torch.from_numpy(np.stack([pad(a, OOV_ROW) for a in columns[7]]))
        scores = self.model.rank(*tensors, cand_items, cand_cats).numpy().astype(np.float64)
        return [scores[i, : len(e[6])] for i, e in enumerate(encoded)]

    def is_current(self, path: Path) -> bool:
        """A bundle at `path` built with the same inputs (checkpoint, data, policy, recipe, seed, SDK)."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return manifest.get("build_key") == self.build_key and all((path / f).is_file() for f in manifest.get("files", {}))

    def program_for(self, shard: Shard) -> bytes:
        if self.stamping:
            if self.template is None:
                self.prepare_stamping()
            return self.template.stamp(slice_constants(self.model, shard, self.ckpt.item_category, self.layout))
        return compile_program(self.model, shard, self.ckpt.item_category, self.recipe, self.layout)

    def build(self, user_id: int, out_root: Path, *, skip_current: bool = False) -> BuildResult:
        return self.build_many([user_id], out_root, skip_current=skip_current)[0]

    def build_many(self, user_ids: list[int], out_root: Path, *, skip_current: bool = False) -> list[BuildResult]:
        """Bundles of several users; their golden vectors are scored in one eager batch."""
        started = time.perf_counter()
        results: dict[int, BuildResult] = {}
        todo = []
        for user_id in user_ids:
            path = bundle_path(out_root, user_id)
            if skip_current and self.is_current(path):
                results[user_id] = BuildResult(user_id, path, (path / PROGRAM).stat().st_size,
                                               sum(f.stat().st_size for f in path.iterdir()), 0.0, 0.0, skipped=True)
            else:
                todo.append((user_id, *self.shard_for(self.user_row(user_id))))
        goldens = self.golden_cases_many([(user_id, shard) for user_id, shard, _ in todo]) if todo else []
        for (user_id, shard, sources), cases in zip(todo, goldens):
            program = self.program_for(shard)
            int8 = None
            if self.recipe == "int8":  # drift vs fp32 within the budget, else fp32 fallback or refusal (sdk_builder/quantize.py)
                from sdk_builder.quantize import apply_accuracy_budget

                int8 = apply_accuracy_budget(self, user_id, shard, program, cases)
                program, cases = int8.program, int8.cases
            golden = GoldenSet(tolerance=GOLDEN_TOLERANCE, cases=cases)
            files = {PROGRAM: program, SCHEMA: self.schema_bytes, GOLDEN: golden.to_json().encode()}
            manifest = self.manifest_for(user_id, shard, sources, {k: sha256_bytes(v) for k, v in sorted(files.items())})
            if int8 is not None:
                manifest = manifest.model_copy(update={"recipe": int8.recipe, "quantization": int8.quantization})
            files[MANIFEST] = manifest.to_json().encode()
            max_diff = replay_golden(manifest, golden, load_runtime_method(program)) if self.verify_each else float("nan")
            if max_diff > GOLDEN_TOLERANCE:
                raise BundleError(f"user {user_id}: the compiled program differs from the eager model by {max_diff:.2e} "
                                  f"(> {GOLDEN_TOLERANCE:g}); not writing the bundle")
            path = write_bundle_atomically(bundle_path(out_root, user_id), files, durable=self.durable)
            results[user_id] = BuildResult(user_id, path, len(program), sum(len(v) for v in files.values()),
                                           0.0, max_diff, manifest_sha256=sha256_bytes(files[MANIFEST]),
                                           recipe=manifest.recipe, note=int8.note if int8 is not None else "")
        seconds = (time.perf_counter() - started) / max(len(todo), 1)
        for r in results.values():
            if not r.skipped:
                r.seconds = seconds
        return [results[u] for u in user_ids]


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


def write_bundle_atomically(final: Path, files: dict[str, bytes], *, durable: bool = False) -> Path:
    """Write `files` into the directory `final` so that readers, and a process killed at any point,
    see the old bundle or the new one, never a mix. `durable` also fsyncs (survives power loss)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of a killed writer (any pid) are never bundles: clear them first.
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        for name, content in files.items():
            with open(tmp / name, "wb") as f:
                f.write(content)
                if durable:
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
    if golden.tolerance != m.golden_tolerance:
        raise BundleError(f"{bundle.path / GOLDEN}: tolerance {golden.tolerance:g} differs from the manifest's {m.golden_tolerance:g}")
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
