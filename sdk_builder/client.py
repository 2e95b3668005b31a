"""The reference client: exactly what a phone does with a bundle.

Parse the history with the pydantic models (the same ones the JSON Schema is generated from), map
global ids to local rows by binary search over the manifest's sorted ids (unknown -> OOV row),
left-pad to the program's history length and run `model.pte` in the ExecuTorch runtime.
Depends on `formats`, `runtime` and `util` only (never on the exporter).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import ValidationError

from sdk_builder.formats import (
    BUNDLE_FORMAT_VERSION, GOLDEN, INT64_MAX, MANIFEST, PROGRAM, BundleError, Event, EventHistory, GoldenCase, GoldenSet,
    IdShard, Manifest, RefreshCase, RefreshedState, RefreshRecord, validation_message,
)
from sdk_builder.runtime import load_runtime_method
from sdk_builder.util import sha256_file, sorted_lookup

if TYPE_CHECKING:
    import torch


def tensors(arrays) -> list[torch.Tensor]:
    """numpy arrays as the runtime takes them (it refuses numpy arrays), sharing their memory.
    torch is imported here, not at the top: parsing a history or an argument needs no torch, and
    by the time a program runs, loading it has imported torch (`sdk_builder.runtime`)."""
    import torch

    return [torch.from_numpy(a) for a in arrays]


def parse_history(text: str | bytes, source: str = "history") -> EventHistory:
    """A history file's text or raw bytes (binary data, not UTF-8, is a one-line error too)."""
    try:
        return EventHistory.model_validate_json(text)
    except ValidationError as exc:
        raise BundleError(validation_message(source, exc)) from None


def check_int64_ids(values, what: str) -> list[int]:
    """Ids and times that fit the program's int64 inputs, as plain ints (never bool)."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) <= INT64_MAX:
            raise BundleError(f"{what}: {v!r} is not an integer in 0..{INT64_MAX}")
        out.append(int(v))
    return out


def local_rows(shard: IdShard, global_ids) -> np.ndarray:
    pos, found = sorted_lookup(shard.ids, global_ids)
    return np.where(found, pos + shard.first_row, shard.oov_row).astype(np.int64)


@dataclass
class EncodedRequest:
    hist_items: np.ndarray
    hist_categories: np.ndarray
    hist_behaviors: np.ndarray
    hist_timestamps: np.ndarray
    request_time: np.ndarray
    candidates: np.ndarray
    user_state: np.ndarray  # float32 [S]

    def tensors(self) -> list[torch.Tensor]:
        return tensors([self.hist_items, self.hist_categories, self.hist_behaviors, self.hist_timestamps,
                        self.request_time, self.candidates, self.user_state])


def state_array(state) -> np.ndarray:
    """A user state as the program takes it: float32, one dimension, contiguous."""
    return np.ascontiguousarray(np.asarray(state, dtype=np.float32).reshape(-1))


def encode_history(manifest: Manifest, events) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local rows, categories, behaviour codes and timestamps of events (oldest first), left-padded
    with 0 to len(events) slots: the caller keeps as many events as its program takes."""
    n = len(events)
    items = np.zeros(n, np.int64)
    cats = np.zeros(n, np.int64)
    behaviors = np.zeros(n, np.int64)
    stamps = np.zeros(n, np.int64)
    if events:
        items[:] = local_rows(manifest.items, [e.item_id for e in events])
        cats[:] = local_rows(manifest.categories, [e.category_id for e in events])
        missing = {e.behavior.value for e in events} - set(manifest.behaviors)
        if missing:
            raise BundleError(f"manifest behaviors: no code for {sorted(missing)}")
        behaviors[:] = [manifest.behaviors[e.behavior.value] for e in events]
        stamps[:] = [e.timestamp for e in events]
    return items, cats, behaviors, stamps


def padded_events(manifest: Manifest, events, width: int) -> tuple[np.ndarray, ...]:
    """`encode_history` of the last `width` events, left-padded with 0 to `width` slots."""
    events = events[-width:] if width else []
    pad = width - len(events)
    return tuple(np.concatenate([np.zeros(pad, np.int64), a]) for a in encode_history(manifest, events))


def encode(manifest: Manifest, history: EventHistory, request_time: int, candidate_ids, state=None) -> EncodedRequest:
    """Program inputs for a history (oldest first) and global candidate ids; `state`: the user
    state to rank with (a refreshed one), else the manifest's."""
    items, cats, behaviors, stamps = padded_events(manifest, history.events, manifest.program.max_history)
    candidates = np.asarray(check_int64_ids(candidate_ids, "candidates"), dtype=np.int64)
    if not 1 <= len(candidates) <= manifest.program.max_candidates:
        raise BundleError(f"candidates: {len(candidates)} given; 1 to {manifest.program.max_candidates} are allowed")
    (request_time,) = check_int64_ids([request_time], "request time")
    return EncodedRequest(items, cats, behaviors, stamps, np.array([request_time], np.int64),
                          local_rows(manifest.items, candidates), state_array(manifest.user_state if state is None else state))


def run_method(method, request: EncodedRequest) -> np.ndarray:
    """Scores of one encoded request from a runtime method (float64, for comparisons)."""
    return method.execute(request.tensors())[0].numpy().astype(np.float64)


def golden_max_diff(cases: list[GoldenCase], requests: list[EncodedRequest], execute) -> float:
    """Max abs difference between `execute(request)` and the golden scores of each case."""
    worst = 0.0
    for case, request in zip(cases, requests):
        worst = max(worst, float(np.max(np.abs(execute(request) - np.asarray(case.scores)))))
    return worst


def refresh_state(state, shipped, record: RefreshRecord, gradient) -> np.ndarray:
    """The client refresh loop, exactly as every client runs it (docs/bundle-format.md): `steps` SGD
    steps on the state with `gradient(state) -> d loss / d state` (the refresh program's output 1),
    each followed by clipping the drift from the shipped state to `max_drift`. Element arithmetic in
    float32 (learning_rate and the clip factor rounded to float32 once), the norm accumulated in
    float64 in element order."""
    state, shipped = state_array(state).copy(), state_array(shipped)
    learning_rate = np.float32(record.learning_rate)
    for _ in range(record.steps):
        state = state - learning_rate * state_array(gradient(state))
        drift = state - shipped
        squared = 0.0
        for v in drift.tolist():
            squared += v * v
        norm = math.sqrt(squared)
        if norm > record.max_drift:
            state = shipped + drift * np.float32(record.max_drift / norm)
    return state


def refresh_inputs(manifest: Manifest, events: list[Event]) -> list[torch.Tensor]:
    """The event inputs of the refresh program: the last `manifest.refresh.events` events, encoded
    like the ranking history (local rows, left-padded with 0)."""
    return tensors(padded_events(manifest, events, manifest.refresh.events))


def refresh_max_diff(manifest: Manifest, cases: list[RefreshCase], method) -> float:
    """Max abs difference between each case's `state_after` and the refresh loop run with `method`."""
    worst = 0.0
    for case in cases:
        inputs = refresh_inputs(manifest, case.events)
        got = refresh_state(case.state_before, manifest.user_state, manifest.refresh,
                            lambda s: method.execute([*tensors([s]), *inputs])[1].numpy())
        worst = max(worst, float(np.max(np.abs(got.astype(np.float64) - np.asarray(case.state_after)))))
    return worst


def read_manifest(bundle: Path) -> Manifest:
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{path}: missing (is {bundle} a bundle directory?)")
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if isinstance(raw, dict) and raw.get("format_version") != BUNDLE_FORMAT_VERSION:
        raise BundleError(f"{path}: format_version {raw.get('format_version')!r} is not supported (this SDK reads {BUNDLE_FORMAT_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(validation_message(str(path), exc)) from None


class Bundle:
    """An opened bundle: manifest checked, files hashed, program loaded in the ExecuTorch runtime."""

    def __init__(self, path: Path, *, check_hashes: bool = True) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        if check_hashes:
            for name, digest in sorted(self.manifest.files.items()):
                file = self.path / name
                if not file.is_file():
                    raise BundleError(f"{file}: listed in the manifest but missing")
                if sha256_file(file) != digest:
                    raise BundleError(f"{file}: sha256 does not match the manifest (corrupted or modified)")
        try:
            self.method = load_runtime_method(str(self.path / PROGRAM))
        except Exception as exc:  # the runtime raises RuntimeError with a multi-line log
            raise BundleError(f"{self.path / PROGRAM}: ExecuTorch could not load it ({type(exc).__name__})") from None
        self._check_program_shapes()

    def _check_program_shapes(self) -> None:
        """The manifest's history length and candidate limit must be the program's own: an app
        encodes requests from the manifest, and a mismatch would fail (or misread) on the phone."""
        spec = self.manifest.program
        shapes = self.method.input_shapes()
        expected = [(spec.max_history,)] * 4 + [(1,), (spec.max_candidates,), (len(self.manifest.user_state),)]
        if shapes != expected:
            raise BundleError(f"{self.path / MANIFEST}: program: max_history {spec.max_history} / max_candidates "
                              f"{spec.max_candidates} / user_state of {len(self.manifest.user_state)} numbers do not "
                              f"match {PROGRAM}'s inputs {[list(s) for s in shapes]}")

    def score(self, history: EventHistory, request_time: int, candidate_ids, state=None) -> np.ndarray:
        """Scores of global candidate ids; `state`: a refreshed user state (`refresh`), else the shipped one."""
        if not self.manifest.accepts(history):
            raise BundleError(f"history is for user {history.user_id}, this bundle is for user {self.manifest.user_id}")
        if state is not None and np.shape(state) != (len(self.manifest.user_state),):
            raise BundleError(f"user state of shape {list(np.shape(state))}; this bundle's is [{len(self.manifest.user_state)}]")
        request = encode(self.manifest, history, request_time, candidate_ids, state)
        return self.execute(request)

    @property
    def refresh_method(self):
        """The refresh program (`manifest.refresh`) in the ExecuTorch runtime, loaded on first use."""
        record = self.manifest.refresh
        if record is None:
            raise BundleError(f"{self.path / MANIFEST}: refresh is null (the bundle was built without --refresh)")
        if getattr(self, "_refresh_method", None) is None:
            path = self.path / record.file
            try:
                method = load_runtime_method(str(path))
            except Exception as exc:
                raise BundleError(f"{path}: ExecuTorch could not load it ({type(exc).__name__})") from None
            size = len(self.manifest.user_state)
            expected = [(size,)] + [(record.events,)] * 4
            if method.input_shapes() != expected:
                raise BundleError(f"{self.path / MANIFEST}: refresh: events {record.events} / user_state of {size} numbers "
                                  f"do not match {record.file}'s inputs {[list(s) for s in method.input_shapes()]}")
            self._refresh_method = method
        return self._refresh_method

    def refresh(self, state, events) -> np.ndarray:
        """The user state after one refresh (`refresh_state`) on `events` (an EventHistory or a list of
        Event, oldest first; the program takes the last manifest.refresh.events) from `state`
        (None: the shipped manifest.user_state)."""
        if isinstance(events, EventHistory):
            if events.user_id != self.manifest.user_id:
                raise BundleError(f"history is for user {events.user_id}, this bundle is for user {self.manifest.user_id}")
            events = events.events
        method, shipped = self.refresh_method, self.manifest.user_state
        state = shipped if state is None else state
        if np.shape(state) != (len(shipped),):
            raise BundleError(f"user state of shape {list(np.shape(state))}; this bundle's is [{len(shipped)}]")
        inputs = refresh_inputs(self.manifest, list(events))
        return refresh_state(state, shipped, self.manifest.refresh,
                             lambda s: method.execute([*tensors([s]), *inputs])[1].numpy())

    def read_state(self, path: Path) -> np.ndarray:
        """A persisted refreshed state (`RefreshedState`) of this bundle; one-line errors otherwise."""
        path = Path(path)
        try:
            saved = RefreshedState.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise BundleError(validation_message(str(path), exc)) from None
        if saved.manifest_sha256 != sha256_file(self.path / MANIFEST):
            raise BundleError(f"{path}: manifest_sha256: the state belongs to another bundle (not {self.path})")
        if len(saved.user_state) != len(self.manifest.user_state):
            raise BundleError(f"{path}: user_state: {len(saved.user_state)} numbers, this bundle's state has "
                              f"{len(self.manifest.user_state)}")
        return state_array(saved.user_state)

    def state_json(self, state) -> str:
        return RefreshedState(manifest_sha256=sha256_file(self.path / MANIFEST),
                              user_state=state_array(state).tolist()).to_json()

    def execute(self, request: EncodedRequest) -> np.ndarray:
        try:
            return run_method(self.method, request)
        except RuntimeError as exc:  # the runtime's message is its multi-line log
            raise BundleError(f"{self.path / PROGRAM}: ExecuTorch could not run it "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None

    def golden(self) -> GoldenSet:
        path = self.path / GOLDEN
        try:
            return GoldenSet.model_validate_json(path.read_bytes())
        except ValidationError as exc:
            raise BundleError(validation_message(str(path), exc)) from None
