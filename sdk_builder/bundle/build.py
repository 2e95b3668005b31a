"""Per-user bundles, orchestrated: shard -> constants -> program (stamped or exported) -> golden
vectors -> (lossy recipes: accuracy budget) -> replay -> atomic write.

A bundle directory holds `model.pte`, `manifest.json`, `events.schema.json` and `golden.json`
(and, built with a `RefreshConfig`, the on-device refresh program `refresh.pte`).
It is written under a temporary name next to its final place and renamed, so readers see either
no bundle or a whole one. Same checkpoint, data, user, policy and seed give identical bytes.
"""

from __future__ import annotations


import json
import time
from dataclasses import astuple, dataclass
from pathlib import Path

import numpy as np
import torch

from model.tbsm import RESERVED_ROWS
from sdk_builder.bundle.budget import BudgetOutcome, apply_accuracy_budget
from sdk_builder.bundle.delta import PreviousBundles, PreviousManifest
from sdk_builder.bundle.golden import (
    GOLDEN_TOLERANCE, REFRESH_TOLERANCE, EagerReference, Request, ShardView, golden_requests, last_events, refresh_cases,
    replay_encoded, score_golden,
)
from sdk_builder.bundle.select import PreviousShard, select_shard
from sdk_builder.bundle.store import bundle_path, cold_start_path, is_current, write_bundle_atomically
from sdk_builder.client import encode, padded_events
from sdk_builder.data.dataset import PreparedData
from sdk_builder.formats import (
    GOLDEN, MANIFEST, PROGRAM, SCHEMA, BundleError, EventHistory, GoldenCase, GoldenSet, Manifest,
    QualityGate, RefreshCase, ShardPolicyRecord, compact_json, events_json_schema,
)
from sdk_builder.program import Shard, SliceLayout, slice_constants
from sdk_builder.recipes import DEFAULT_ACCURACY_BUDGET, DEFAULT_RECIPE, get_recipe
from sdk_builder.refresh import (
    REFRESH_FILE, RefreshConfig, build_refresh_template, check_refresh_stamping, eager_gradient, refresh_constants,
)
from sdk_builder.runs import LoadedCheckpoint, versions
from sdk_builder.runtime import load_runtime_method
from sdk_builder.shard import DEFAULT_SLACK, PreviousLists, ShardIndex, ShardPolicy
from sdk_builder.stamp import ProgramTemplate, build_template, check_against_export
from sdk_builder.util import sha256_bytes


@dataclass
class BuildResult:
    user_id: int | None  # None: the cold-start bundle
    path: Path
    bytes_program: int
    bytes_total: int
    seconds: float
    max_golden_diff: float  # NaN when the build did not replay the golden vectors (stamped, guarded at start)
    skipped: bool = False  # already up to date
    manifest_sha256: str = ""
    recipe: str = ""  # the bundle's recipe (a lossy build that fell back to fp32 says so in `note`)
    note: str = ""  # lossy (int8) builds: measured drift vs the accuracy budget


def build_key(ckpt: LoadedCheckpoint, data: PreparedData, policy: ShardPolicy, recipe: str, seed: int,
              layout: SliceLayout, sdk_version: str, budget: tuple[float, str] | None,
              refresh: RefreshConfig | None = None) -> str:
    """Hash of everything a bundle is built from: equal keys mean an up-to-date bundle."""
    key_material = json.dumps({"checkpoint": ckpt.sha256, "data": data.fingerprint(), "policy": policy.to_dict(),
                               "recipe": recipe, "seed": seed, "layout": astuple(layout),
                               "sdk": sdk_version, "format": Manifest.model_fields["format_version"].default,
                               **({"budget": list(budget)} if budget is not None else {}),
                               **({"refresh": refresh.record().model_dump()} if refresh is not None else {})},
                              sort_keys=True)
    return sha256_bytes(key_material.encode())


def quality_gate(ckpt: LoadedCheckpoint, allow_weak_model: bool) -> QualityGate | None:
    """The run's on-device-style validation against popularity; refuses (BundleError, naming both
    numbers) a model whose shipped ranking does not beat popularity, unless `allow_weak_model`."""
    record = ckpt.payload.get("ranking_validation")
    if not record or "blended" not in record:
        if allow_weak_model:
            return None
        raise BundleError(f"{ckpt.path}: the checkpoint has no on-device validation to compare with popularity "
                          "(trained by an older tbsm-sdk?): retrain it, or pass --allow-weak-model")
    gate = QualityGate(metric=record["metric"], shipped=record["blended"], model_alone=record["model_alone"],
                       policy_order=record["policy_order"], popularity=record["popularity"],
                       prior_weight=record["blend_weight"], users=record["users"],
                       passed=record["blended"] > record["popularity"])
    if not gate.passed and not allow_weak_model:
        raise BundleError(f"{ckpt.path}: the model does not beat popularity on its on-device validation: HR@10 "
                          f"{gate.shipped:.4f} vs popularity {gate.popularity:.4f} over {gate.users:,} users; "
                          "retrain (more data, epochs), or pass --allow-weak-model to ship it anyway")
    return gate


class BundleBuilder:
    """Builds bundles from one checkpoint and the data it was trained on (or that data extended
    with newer events, `sdk_builder.data.dataset.extend_events`).

    With `stamping` (the default) the program is exported once (`prepare_stamping`) and each
    user's `model.pte` is the template with that user's constants written in; otherwise every
    bundle is a full `torch.export` + lowering (the slow path the stamping is checked against).
    """

    def __init__(self, ckpt: LoadedCheckpoint, data: PreparedData, policy: ShardPolicy | None = None,
                 recipe: str = DEFAULT_RECIPE, seed: int = 0, *, stamping: bool = True, category_capacity: int = 256,
                 verify_each: bool = True, durable: bool = False,
                 accuracy_budget: float = DEFAULT_ACCURACY_BUDGET, on_budget_exceeded: str = "fail",
                 allow_weak_model: bool = False, refresh: RefreshConfig | None = None,
                 previous: PreviousBundles | None = None, shard_slack: float = DEFAULT_SLACK) -> None:
        trained_on = ckpt.payload["data_fingerprint"]
        # The run's own data, or that data extended with newer events (`extend_events`: same id maps).
        if data.fingerprint() != trained_on and data.info.get("extends") != trained_on:
            raise BundleError("the data does not match the checkpoint's data fingerprint")
        self.quality = quality_gate(ckpt, allow_weak_model)
        self.ckpt, self.data, self.seed = ckpt, data, seed
        self.recipe = recipe  # the name, as in the manifest
        self.steps = get_recipe(recipe)  # how programs of this recipe are built (sdk_builder/recipes)
        # Lossy recipes only (int8): max |score drift| vs fp32, and "fail" or "fp32" beyond it.
        self.accuracy_budget, self.on_budget_exceeded = accuracy_budget, on_budget_exceeded
        self.policy = policy or ShardPolicy()
        self.index = ShardIndex(data, self.policy)
        # Bundles rank by sigmoid(a * logit + b * policy prior), a = 1 / (1 + w), b = w / (1 + w) for
        # the run's prior weight w: the order of logit + w * prior, with scores that stay in float32
        # range for any w. `a` folds into the model's last layer, `b` into each shard's prior.
        weight = self.quality.prior_weight if self.quality is not None else 0.0
        self.prior_scale = weight / (1.0 + weight)
        self.model = ckpt.model.eval().with_logit_scale(1.0 / (1.0 + weight))
        self.reference = EagerReference(self.model, ckpt)
        self.stamping = stamping
        self.durable = durable
        # Replaying the golden vectors in the runtime costs ~0.5 ms a bundle and is the only check
        # that the program, the stamping and the eager reference agree for *this* user.
        self.verify_each = verify_each
        self.layout = SliceLayout(self.policy.shard_size + RESERVED_ROWS,
                                  min(ckpt.categories.rows, max(category_capacity, 1) + RESERVED_ROWS), self.policy.neighbors)
        self.template: ProgramTemplate | None = None
        # On-device refresh (`--refresh`): its program is stamped from its own template.
        self.refresh = refresh
        self.refresh_template: ProgramTemplate | None = None
        self.versions = versions()
        self.model_config = ckpt.config.to_dict()
        self.schema_bytes = compact_json(events_json_schema()).encode()
        self.build_key = build_key(ckpt, data, self.policy, recipe, seed, self.layout, self.versions["tbsm_sdk"],
                                   (accuracy_budget, on_budget_exceeded) if self.steps.lossy else None, refresh)
        # Each user's previous bundle (`build --delta-from`): its shard's items are favoured (shard hysteresis).
        self.previous, self.shard_slack = previous, shard_slack

    def prepare_refresh(self) -> float:
        """Export the refresh template once; the stamped and a fully exported program of the first
        user must give the same loss and gradient in the runtime on that user's events."""
        user_id = int(self.ckpt.users.ids[0])
        shard = self.shard_for(self.user_row(user_id))[0]
        template = build_refresh_template(self.model, self.layout, shard, self.ckpt.item_category, self.refresh)
        view = ShardView(self.ckpt, shard)
        events = last_events(self.ckpt, self.data, shard.user_row, self.refresh.events)
        inputs = [torch.from_numpy(view.user_state),
                  *(torch.from_numpy(a) for a in padded_events(view, events, self.refresh.events))]
        worst = check_refresh_stamping(template, self.model, self.refresh_constants_for(shard), self.refresh, inputs)
        self.refresh_template = template
        return worst

    def refresh_constants_for(self, shard: Shard):
        return refresh_constants(self.model, shard, self.ckpt.item_category, self.layout, self.constants_for(shard))

    def refresh_program_for(self, shard: Shard) -> bytes:
        if self.refresh_template is None:
            self.prepare_refresh()
        return self.refresh_template.stamp(self.refresh_constants_for(shard))

    def prepare_stamping(self, guard_users: int = 3) -> float:
        """Export the template once and check it: stamped vs fully exported programs of a few users
        must agree in the runtime. Returns the max abs difference seen (0 when bit-identical)."""
        users = [int(u) for u in self.ckpt.users.ids[: max(guard_users, 1)]]
        shards = [self.shard_for(self.user_row(u))[0] for u in users]
        template = build_template(self.model, self.layout, self.steps, shards[0], self.ckpt.item_category)
        requests = [encode(ShardView(self.ckpt, shard), case.history, case.request_time, case.candidates).tensors()
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

    def shard_for(self, user_row: int, previous: PreviousShard | None = None) -> tuple[Shard, dict[str, int]]:
        return select_shard(self.data, self.index, self.layout, user_row, self.prior_scale, previous, self.shard_slack)

    def previous_shard(self, user_id: int) -> tuple[PreviousShard | None, str]:
        """(the user's previous shard or None, the user's build key): a bundle kept from a previous
        one depends on it, so its key names the previous manifest too."""
        found = self.previous.shard_of(user_id) if self.previous is not None else None
        if found is None:
            return None, self.build_key
        rows = self.ckpt.items.lookup(np.asarray(found.item_ids, np.int64), unknown=-1)
        key = sha256_bytes(json.dumps({"build": self.build_key, "previous_manifest": found.manifest_sha256,
                                       "slack": self.shard_slack}, sort_keys=True).encode())
        tables = self.previous_tables(found, len(rows))
        if tables is None or not len(rows):
            return PreviousShard(rows[rows >= RESERVED_ROWS]), key
        slots, neighbors, codes = tables
        # Full rows of the listed neighbours; an id the checkpoint does not know lists nothing.
        neighbor_rows = np.where(neighbors >= RESERVED_ROWS, rows[np.maximum(neighbors - RESERVED_ROWS, 0)], 0)
        known = rows >= RESERVED_ROWS
        lists = PreviousLists(rows[known], np.maximum(neighbor_rows[known], 0), codes[known])
        return PreviousShard(rows[known], slots[known], lists), key

    def previous_tables(self, previous: PreviousManifest, n_items: int) -> tuple[np.ndarray, ...] | None:
        """(slot [n], co-visit lists as local rows [n, k], their codes [n, k]) of the previous bundle's
        items (its local order), read from its program when that was stamped from this builder's
        template (same checkpoint, recipe, layout and SDK: every byte outside the per-user constants
        equal); else None (the rebuild's slots are its rows and its lists are chosen afresh)."""
        if not self.stamping or previous.checkpoint_sha256 != self.ckpt.sha256 or previous.recipe != self.recipe:
            return None
        if self.template is None:
            self.prepare_stamping()
        template, program = self.template, previous.program_bytes()
        if n_items + RESERVED_ROWS > self.layout.item_rows or not template.stamped_from_this(program):
            return None
        rows = self.layout.item_rows
        slot = template.constant(program, "item_slot").astype(np.int64)
        items = slice(RESERVED_ROWS, RESERVED_ROWS + n_items)
        rest = np.r_[0:RESERVED_ROWS, RESERVED_ROWS + n_items : rows]
        neighbors = template.constant(program, "item_neighbors").astype(np.int64)  # by slot, listing slots
        if not (np.array_equal(np.sort(slot[items]), np.arange(RESERVED_ROWS, RESERVED_ROWS + n_items))
                and np.array_equal(slot[rest], rest) and neighbors.min() >= 0
                and neighbors.max() < RESERVED_ROWS + n_items):
            raise BundleError(f"{previous.path / PROGRAM}: its item_slot or item_neighbors table does not fit its "
                              f"{n_items} items; rebuild without --delta-from")
        row_of_slot = np.empty(rows, np.int64)
        row_of_slot[slot] = np.arange(rows)
        listed = neighbors[slot[items]]
        return slot[items], row_of_slot[listed] * (listed > 0), template.constant(program, "neighbor_weights")[slot[items]]

    def constants_for(self, shard: Shard):
        return slice_constants(self.model, shard, self.ckpt.item_category, self.layout)

    def manifest_for(self, user_id: int, shard: Shard, sources: dict[str, int], files: dict[str, str],
                     view: ShardView | None = None, build_key: str | None = None) -> Manifest:
        """The manifest of one bundle, from values we computed ourselves: constructed without
        per-bundle validation (`check_formats` validates one bundle of every batch instead).
        `build_key`: the user's own (`previous_shard`), else the builder's."""
        view = view or ShardView(self.ckpt, shard)
        return Manifest.model_construct(
            versions=self.versions, kind="personal" if user_id is not None else "cold_start",
            user_id=user_id, recipe=self.recipe, checkpoint_sha256=self.ckpt.sha256,
            model_config=self.model_config, program=view.program, user_state=view.user_state.tolist(),
            items=view.items, categories=view.categories,
            shard_policy=ShardPolicyRecord.model_construct(name=self.policy.name, shard_size=self.policy.shard_size,
                                                           weights=self.policy.weights, sources=sources),
            seeds={"train": int(self.ckpt.payload.get("seed", 0)), "bundle": self.seed},
            golden_tolerance=GOLDEN_TOLERANCE, files=files, build_key=build_key or self.build_key, quality=self.quality,
        )

    def refresh_cases(self, user_id: int, shard: Shard, view: ShardView, method) -> list[RefreshCase]:
        """Refresh golden cases: the client loop on the user's own last events, run with the runtime
        program `method`, which is what every client must reproduce. Each step's runtime gradient
        is checked against eager autograd at the same state (with `verify_each`). Whole loops are not
        compared: a step of learning_rate x gradient can flip a ReLU on one side of a ~1e-7
        difference and not the other, and five steps then drift apart (2.3e-2 for one user)."""
        constants = self.refresh_constants_for(shard)
        events = last_events(self.ckpt, self.data, shard.user_row, self.refresh.events)
        worst = 0.0

        def gradient(state: np.ndarray, inputs: list[torch.Tensor]) -> np.ndarray:
            nonlocal worst
            got = method.execute([torch.from_numpy(state), *inputs])[1].numpy()
            if self.verify_each:
                want = eager_gradient(self.model, constants, self.refresh, [torch.from_numpy(state), *inputs])[1]
                worst = max(worst, float(np.max(np.abs(got - want))))
            return got

        cases = refresh_cases(view, events, self.refresh.record(), gradient)
        step_difference = worst * self.refresh.learning_rate
        if step_difference > REFRESH_TOLERANCE:
            raise BundleError(f"user {user_id}: a step of the refresh program differs from the eager one by "
                              f"{step_difference:.2e} (> {REFRESH_TOLERANCE:g}); not writing the bundle")
        return cases

    def golden_requests(self, user_id: int, shard: Shard) -> list[GoldenCase]:
        return golden_requests(self.ckpt, self.data, self.seed, user_id, shard)

    def golden_cases(self, user_id: int, shard: Shard) -> list[GoldenCase]:
        return self.golden_cases_many([(user_id, shard)])[0]

    def golden_cases_many(self, users: list[tuple[int, Shard]]) -> list[list[GoldenCase]]:
        """Golden cases of several users, scored by the eager full model."""
        return [cases for _, cases, _ in self.scored_golden(users)]

    def scored_golden(self, users: list[tuple[int, Shard]]) -> list[tuple[ShardView, list[GoldenCase], list]]:
        """Per user: (its shard view, golden cases with eager scores, their encoded requests)."""
        views = [ShardView(self.ckpt, shard) for _, shard in users]
        cases = [self.golden_requests(user_id, shard) for user_id, shard in users]
        encoded = score_golden(self.reference, [(v, shard, c) for v, (_, shard), c in zip(views, users, cases)])
        return list(zip(views, cases, encoded))

    def eager_scores(self, shard: Shard, history: EventHistory, request_time: int, candidate_ids) -> np.ndarray:
        return self.reference.scores_mixed([(shard, history, request_time, candidate_ids)])[0]

    def eager_scores_many(self, shard: Shard, requests: list[Request]) -> list[np.ndarray]:
        return self.reference.scores_many(shard, requests)

    def eager_scores_mixed(self, requests: list[tuple[Shard, EventHistory, int, list[int]]]) -> list[np.ndarray]:
        return self.reference.scores_mixed(requests)

    def is_current(self, path: Path) -> bool:
        """A bundle at `path` built with the same inputs (checkpoint, data, policy, recipe, seed, SDK)."""
        return is_current(path, self.build_key)

    def program_for(self, shard: Shard) -> bytes:
        if self.stamping:
            if self.template is None:
                self.prepare_stamping()
            return self.template.stamp(self.constants_for(shard))
        return self.steps.compile(self.model, self.constants_for(shard))

    def check_budget(self, user_id: int, shard: Shard, program: bytes, cases: list[GoldenCase]) -> BudgetOutcome:
        """Lossy recipes: drift vs fp32 within the budget, else fp32 fallback or refusal (bundle/budget.py)."""
        fallback = get_recipe(self.steps.fallback) if self.steps.fallback else None
        return apply_accuracy_budget(
            self.steps, program, cases, ShardView(self.ckpt, shard),
            reference_scores=lambda requests: self.reference.scores_many(shard, requests),
            eager_program=lambda: self.steps.program(self.model, self.constants_for(shard)).eval(),
            fallback_program=lambda: fallback.compile(self.model, self.constants_for(shard)),
            budget=float(self.accuracy_budget), on_exceeded=self.on_budget_exceeded, user_id=user_id)

    def build(self, user_id: int, out_root: Path, *, skip_current: bool = False) -> BuildResult:
        return self.build_many([user_id], out_root, skip_current=skip_current)[0]

    def build_many(self, user_ids: list[int], out_root: Path, *, skip_current: bool = False) -> list[BuildResult]:
        """Bundles of several users; the first one built is checked against the pydantic formats."""
        started = time.perf_counter()
        results: dict[int, BuildResult] = {}
        todo = []
        for user_id in user_ids:
            path = bundle_path(out_root, user_id)
            previous, key = self.previous_shard(user_id)
            if skip_current and is_current(path, key):
                results[user_id] = BuildResult(user_id, path, (path / PROGRAM).stat().st_size,
                                               sum(f.stat().st_size for f in path.iterdir()), 0.0, 0.0, skipped=True)
            else:
                todo.append((user_id, *self.shard_for(self.user_row(user_id), previous), key))
        goldens = self.scored_golden([(user_id, shard) for user_id, shard, _, _ in todo]) if todo else []
        for k, ((user_id, shard, sources, key), golden) in enumerate(zip(todo, goldens)):
            results[user_id] = self._build_one(user_id, shard, sources, *golden, out_root, check_formats=k == 0,
                                               build_key=key)
        seconds = (time.perf_counter() - started) / max(len(todo), 1)
        for r in results.values():
            if not r.skipped:
                r.seconds = seconds
        return [results[u] for u in user_ids]

    def _build_one(self, user_id: int, shard: Shard, sources: dict[str, int], view: ShardView, cases: list[GoldenCase],
                   requests: list, out_root: Path, *, check_formats: bool = True,
                   build_key: str | None = None) -> BuildResult:
        program = self.program_for(shard)
        budget = self.check_budget(user_id, shard, program, cases) if self.steps.lossy else None
        if budget is not None:
            program, cases = budget.program, budget.cases
        golden = GoldenSet.model_construct(tolerance=GOLDEN_TOLERANCE, cases=cases, refresh_cases=[])
        files = {PROGRAM: program, SCHEMA: self.schema_bytes}
        if self.refresh is not None:
            files[REFRESH_FILE] = self.refresh_program_for(shard)
            golden.refresh_cases = self.refresh_cases(user_id, shard, view, load_runtime_method(files[REFRESH_FILE]))
        files[GOLDEN] = golden.to_json().encode()
        manifest = self.manifest_for(user_id, shard, sources, {k: sha256_bytes(v) for k, v in sorted(files.items())}, view,
                                     build_key)
        if budget is not None:
            manifest = manifest.model_copy(update={"recipe": budget.recipe, "quantization": budget.quantization})
        if self.refresh is not None:
            manifest = manifest.model_copy(update={"refresh": self.refresh.record()})
        files[MANIFEST] = manifest.to_json().encode()
        if check_formats:
            check_against_formats(files)
        max_diff = replay_encoded(golden, requests, load_runtime_method(program)) if self.verify_each else float("nan")
        if max_diff > GOLDEN_TOLERANCE:
            who = f"user {user_id}" if user_id is not None else "cold start"
            raise BundleError(f"{who}: the compiled program differs from the eager model by {max_diff:.2e} "
                              f"(> {GOLDEN_TOLERANCE:g}); not writing the bundle")
        final = bundle_path(out_root, user_id) if user_id is not None else cold_start_path(out_root)
        path = write_bundle_atomically(final, files, durable=self.durable)
        return BuildResult(user_id, path, len(program), sum(len(v) for v in files.values()),
                           0.0, max_diff, manifest_sha256=sha256_bytes(files[MANIFEST]),
                           recipe=manifest.recipe, note=budget.note if budget is not None else "")


def check_against_formats(files: dict[str, bytes]) -> None:
    """Manifests and golden sets are constructed without validation (ours, and validating costs more
    than the rest of a bundle): one bundle per batch is validated and must re-serialise to its bytes."""
    for name, model in ((MANIFEST, Manifest), (GOLDEN, GoldenSet)):
        try:
            same = model.model_validate_json(files[name]).to_json().encode() == files[name]
        except ValueError as exc:
            raise BundleError(f"{name}: the built file fails its own format: {str(exc).splitlines()[0]}") from None
        if not same:
            raise BundleError(f"{name}: the built file does not round-trip through its format")
