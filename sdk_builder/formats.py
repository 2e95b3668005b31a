"""File formats of a bundle: the single source of truth (no torch: the phone-side client uses it).

`events.schema.json` and the manifest's shape are generated from these pydantic models; the
templates (Kotlin, Swift, C++) read exactly the field names defined here, and a test checks that
they do not drift. This module also owns the bundle's file names, the behaviour codes and
`BundleError`. The row codes of the contract (padding, OOV, first real row) are the model's
(`model.tbsm`); a test checks that the copies below, which the file format needs without torch,
agree with them.
"""

from __future__ import annotations

import base64
import json
import re
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, StringConstraints, ValidationError, WithJsonSchema,
    model_validator,
)

# 3: manifest items.ids / categories.ids are base64 delta-encoded 3-byte units (`encode_ids`), no longer JSON lists.
BUNDLE_FORMAT_VERSION = 3
MAX_HISTORY = 20
MAX_CANDIDATES = 4096
# The on-device row codes: model.tbsm.PADDING_ROW, OOV_ROW and RESERVED_ROWS (tests/test_layering.py).
PADDING_ROW = 0
OOV_ROW = 1
FIRST_REAL_ROW = 2

# The files of a bundle directory.
MANIFEST = "manifest.json"
PROGRAM = "model.pte"
SCHEMA = "events.schema.json"
GOLDEN = "golden.json"
BUNDLE_FILES = (PROGRAM, MANIFEST, SCHEMA, GOLDEN)
# Optional: HMAC-SHA256 of manifest.json's bytes under the app's key (`build --sign-key`).
SIGNATURE = "manifest.json.hmac"
BUILD_CACHE = "build-cache"  # in a run directory: what `build` cached (templates, the user id map)
# Every id and time reaches the program as an int64 tensor.
INT64_MAX = 2**63 - 1


def parse_int64_text(text: str) -> int | None:
    """A non-negative int64 written as 1-19 ASCII digits, else None (str.isdigit() also accepts
    '²' and other digits int() cannot read)."""
    return int(text) if re.fullmatch(r"[0-9]{1,19}", text) and int(text) <= INT64_MAX else None
# Names in a manifest's `files`: plain names inside the bundle directory (no separators, no
# "..", no hidden or absolute paths), so a manifest can never point outside its bundle.
PLAIN_FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class BundleError(ValueError):
    """A bundle, history or request that cannot be used. The message is one line."""


def validation_message(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(root)"
    return f"{source}: {where}: {err['msg']}"


class Behavior(str, Enum):
    """Event kinds of the Taobao log. The on-device code is the position + 1; 0 is padding."""

    pv = "pv"
    buy = "buy"
    cart = "cart"
    fav = "fav"


BEHAVIORS: tuple[str, ...] = tuple(b.value for b in Behavior)
BEHAVIOR_CODES: dict[str, int] = {b: i + 1 for i, b in enumerate(BEHAVIORS)}
BEHAVIOR_NAMES: dict[int, str] = {code: name for name, code in BEHAVIOR_CODES.items()}

# Strict: the JSON must hold an integer, not "12", 1.0 or true (the JSON Schema says "integer");
# bounded by int64 because every id and time reaches the program as an int64.
NonNegativeInt = Annotated[int, Field(ge=0, le=INT64_MAX, strict=True)]


class Event(BaseModel):
    """One interaction recorded on the phone."""

    model_config = ConfigDict(extra="forbid")

    item_id: NonNegativeInt = Field(description="Global item id, as in the training log.")
    category_id: NonNegativeInt = Field(description="Global category id of the item.")
    behavior: Behavior = Field(description="Kind of interaction.")
    timestamp: NonNegativeInt = Field(description="Unix time in seconds.")


class EventHistory(BaseModel):
    """The user's recent events, oldest first. The phone keeps at most `MAX_HISTORY` of them."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "description": (
                "On-device event history of one user. Events are ordered by timestamp, oldest "
                f"first (non-decreasing timestamps); at most {MAX_HISTORY} events: the app drops "
                "the oldest when recording a new one. An empty list is allowed (a new user)."
            )
        },
    )

    user_id: NonNegativeInt | None = Field(
        description="Global id of the user the bundle was built for; null with a cold-start bundle (a new user, "
                    "who may have no id yet).")
    events: list[Event] = Field(max_length=MAX_HISTORY, description="Oldest first; [] for a user with no events yet.")

    @model_validator(mode="after")
    def _time_ordered(self) -> EventHistory:
        for i in range(1, len(self.events)):
            if self.events[i].timestamp < self.events[i - 1].timestamp:
                raise ValueError(
                    f"events[{i}].timestamp {self.events[i].timestamp} is earlier than "
                    f"events[{i - 1}].timestamp {self.events[i - 1].timestamp}; events must be oldest first"
                )
        return self


def compact_json(obj: Any) -> str:
    """Bundle JSON: sorted keys (byte-identical rebuilds), no indentation (every byte is downloaded)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n"


def events_json_schema() -> dict[str, Any]:
    schema = EventHistory.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://tbsm-sdk/events.schema.json",
        "title": "TBSM on-device event history",
        **{k: v for k, v in schema.items() if k != "title"},
    }


class TensorSpec(BaseModel):
    name: str
    dtype: str
    shape: list[int | str]
    description: str


class ProgramSpec(BaseModel):
    method: str = "forward"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_history: int = Field(MAX_HISTORY, ge=1, le=1024)
    max_candidates: int = Field(MAX_CANDIDATES, ge=1, le=1 << 20)
    padding: str = (
        "History tensors are left-padded: the most recent event is at index max_history-1; "
        "padding slots hold row 0 (items, categories), behavior 0 and timestamp 0."
    )


# Each value (the first id, then each difference) in 23-bit groups, least significant first, one group
# a 3-byte unit: base64 turns every 3 bytes into 4 characters, so an id entering or leaving the shard
# changes only its own and its neighbour's characters and the rest of the text stays aligned (delta
# patches copy it). 3 units hold 69 bits: every delta, like every id, fits a non-negative int64.
ID_UNIT_BITS = 23
ID_UNIT_MORE = 1 << ID_UNIT_BITS
MAX_ID_UNITS = 3
BASE64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
IDS_ENCODING = (
    "Sorted, unique, non-negative int64 ids, stored compactly: the first id, then each id minus the one "
    f"before it (>= 1). Each value is split into {ID_UNIT_BITS}-bit groups, least significant first, "
    f"as few as hold it (at most {MAX_ID_UNITS}; 0 takes one); each group is one 3-byte unit, big-endian, "
    f"group | 0x800000 if more groups of the value follow. The units' bytes in standard base64 (RFC 4648 "
    "section 4), which for whole units is 4 characters a unit and never padded; no ids: the empty string."
)


def encode_ids(ids) -> str:
    """Strictly increasing non-negative ids as a manifest stores them (IDS_ENCODING): 4 characters an id
    in a shard of 1000 items (differences below 2**23) instead of ~8 as a JSON list."""
    import numpy as np  # here, not at the top: the CLI imports this module at start-up, before any bundle

    values = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not len(values):
        return ""
    deltas = np.diff(values, prepend=0)
    if values[0] < 0 or (deltas[1:] <= 0).any():
        raise ValueError("ids must be non-negative, sorted and unique")
    deltas = deltas.astype(np.uint64)
    position = np.arange(MAX_ID_UNITS)
    groups = (deltas[:, None] >> (position * ID_UNIT_BITS).astype(np.uint64)) & np.uint64(ID_UNIT_MORE - 1)
    length = 1 + (deltas >= 1 << ID_UNIT_BITS) + (deltas >= 1 << 2 * ID_UNIT_BITS)  # 0 takes a unit
    groups |= np.where(position < (length - 1)[:, None], np.uint64(ID_UNIT_MORE), np.uint64(0))
    units = groups[position < length[:, None]].astype(">u4").view(np.uint8).reshape(-1, 4)[:, 1:]
    return base64.b64encode(units.tobytes()).decode("ascii")


def decode_ids(text: str) -> list[int]:
    """The ids `encode_ids` wrote; a ValueError with a one-line reason for anything else."""
    import numpy as np

    bad = next((i for i, c in enumerate(text) if c not in BASE64_ALPHABET), None)
    if bad is not None:
        raise ValueError(f"not base64 (character {text[bad]!r} at {bad}; whole units are never padded)")
    if len(text) % 4:
        raise ValueError(f"truncated unit: {len(text)} characters is not a whole number of 4-character units")
    if not text:
        return []
    b = np.frombuffer(base64.b64decode(text), dtype=np.uint8).reshape(-1, 3).astype(np.uint32)
    units = b[:, 0] << 16 | b[:, 1] << 8 | b[:, 2]
    more = units >= ID_UNIT_MORE
    if more[-1]:
        raise ValueError(f"truncated value: its last unit ({len(units) - 1}) says more units follow")
    ends = np.flatnonzero(~more)
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > MAX_ID_UNITS:
        k = int(np.argmax(lengths > MAX_ID_UNITS))
        raise ValueError(f"value {k} (at unit {starts[k]}) has more than {MAX_ID_UNITS} units: not an int64")
    position = np.arange(len(units)) - np.repeat(starts, lengths)
    groups = (units & (ID_UNIT_MORE - 1)).astype(np.uint64)
    # A last group with bits from 63 - 46 = 17 up makes a value of 2**63 or more (and would shift out of 64 bits).
    too_big = (position == MAX_ID_UNITS - 1) & (groups >> np.uint64(63 - (MAX_ID_UNITS - 1) * ID_UNIT_BITS) != 0)
    if too_big.any():
        raise ValueError(f"id {int(np.searchsorted(ends, np.argmax(too_big)))} exceeds int64")
    deltas = np.add.reduceat(groups << (position * ID_UNIT_BITS).astype(np.uint64), starts)  # disjoint bits: sum = OR
    if (deltas[1:] == 0).any():
        raise ValueError(f"id {int(np.argmax(deltas[1:] == 0)) + 1} repeats the one before it: ids must be sorted and unique")
    ids = np.cumsum(deltas)  # each delta < 2**63, so the first sum past INT64_MAX is still exact
    if (ids > INT64_MAX).any():
        raise ValueError(f"id {int(np.argmax(ids > INT64_MAX))} exceeds int64")
    return ids.astype(np.int64).tolist()


def _ids_of_manifest(value: Any) -> list[int]:
    if not isinstance(value, str):
        raise ValueError(f"must be a string of base64 id units (format_version {BUNDLE_FORMAT_VERSION}), "
                         f"not {type(value).__name__}")
    return decode_ids(value)


# In Python a list of ints; in manifest.json a string (IDS_ENCODING). Bundles are built with
# model_construct (no validation), so only files are validated: a list there is the old format.
EncodedIds = Annotated[
    list[int],
    PlainValidator(_ids_of_manifest),
    PlainSerializer(encode_ids, return_type=str),
    WithJsonSchema({"type": "string", "contentEncoding": "base64", "description": IDS_ENCODING}),
]


class IdShard(BaseModel):
    """Global ids present in the bundle, sorted ascending; the local row of ids[i] is i + first_row."""

    ids: EncodedIds
    first_row: int = FIRST_REAL_ROW
    padding_row: int = PADDING_ROW
    oov_row: int = OOV_ROW


class ShardPolicyRecord(BaseModel):
    """The shard policy as recorded in a manifest (the policy itself: `sdk_builder.shard.ShardPolicy`)."""

    name: str
    shard_size: int
    weights: dict[str, float]
    sources: dict[str, int] = Field(description="How many shard items each source contributed.")


class Quantization(BaseModel):
    """The build-time accuracy check of a bundle built with `--recipe int8` (see docs/bundle-format.md)."""

    requested_recipe: str = Field(description="The recipe asked for: int8.")
    tables: list[str] = Field(description="Per-user tables stored lossy: per-row int8 or fp16 (docs/bundle-format.md, int8 bundles).")
    accuracy_budget: float = Field(description="Max |score drift| allowed against the fp32 model.")
    max_score_drift: float = Field(description="Measured max |int8 program in the ExecuTorch runtime - fp32 eager "
                                               "full model| over the golden histories x every shard item.")
    drift_points: int = Field(description="How many scores the drift was measured on.")
    fallback: bool = Field(description="True: the drift exceeded the budget and this bundle was built fp32 instead.")


class QualityGate(BaseModel):
    """How the run's model ranked on its on-device-style validation (each validation user's shard,
    HR@10 of the next event) against popularity, and what `build` decided from it."""

    metric: str = Field(description="The validation metric, hr@10.")
    shipped: float = Field(description="The shipped ranking: sigmoid(model logit + prior_weight * policy prior).")
    model_alone: float = Field(description="The model's logit alone.")
    policy_order: float = Field(description="The shard policy's own order, no model.")
    popularity: float = Field(description="The shard in popularity order: what `shipped` must beat.")
    prior_weight: float = Field(description="Weight of the shard policy's prior in every score (chosen on validation).")
    users: int = Field(description="Validation users the numbers are averaged over.")
    passed: bool = Field(description="shipped > popularity; false only when built with --allow-weak-model.")


BundleKind = Literal["personal", "cold_start"]
class RefreshRecord(BaseModel):
    """The on-device refresh of a bundle built with `--refresh` (docs/bundle-format.md, on-device refresh)."""

    file: str = Field(description="The training program: inputs user_state float32 [S] and the last `events` "
                                  "on-device events (items, categories, behaviors, timestamps: int64, encoded like "
                                  "the ranking history, left-padded with 0); outputs 0 loss float32 [1], 1 gradient "
                                  "float32 [S] = d loss / d user_state.")
    method: str = "forward"
    window: int = Field(ge=1, description="Positives: the last `window` events, each after the max_history events before it.")
    events: int = Field(ge=1, description="W = program.max_history + window: how many events the program takes.")
    every_events: int = Field(ge=1, description="Refresh when the on-device history has grown by this many events.")
    steps: int = Field(ge=1, description="SGD steps of one refresh.")
    learning_rate: float = Field(gt=0, description="Step size (used as float32).")
    max_drift: float = Field(gt=0, description="Max L2 distance of a refreshed state from manifest.user_state.")
    negatives: int = Field(ge=1, description="Shard items the program scores as negatives per positive (informative).")


def shortest_float32(values) -> list[float]:
    """float32 values as the doubles of their shortest decimals that read back as the same float32
    (numpy's shortest repr): ~9 digits in JSON where the exact double takes ~17, within half a float32
    ulp of it (far inside any golden tolerance)."""
    import numpy as np

    return [float(str(np.float32(v))) for v in values]


# float32 vectors in JSON: written in float32's shortest digits, read back as the same float32 values.
Float32List = Annotated[list[float], PlainSerializer(shortest_float32, when_used="json")]


class Manifest(BaseModel):
    format_version: int = BUNDLE_FORMAT_VERSION
    versions: dict[str, str]
    kind: BundleKind = Field(default="personal", description=(
        "personal: one user's bundle (user_id set); cold_start: for users without a personal bundle (a new "
        "install): a population user vector and popular, category-diverse items (user_id null)."))
    user_id: int | None = Field(description="The user of a personal bundle; null for a cold-start bundle.")
    recipe: str
    checkpoint_sha256: str
    model_config_: dict[str, Any] = Field(alias="model_config")
    program: ProgramSpec
    user_state: Float32List = Field(description="The user state shipped with the bundle, float32 values: the program's "
                                                "`user_state` input unless the app has a refreshed state for this bundle.")
    items: IdShard
    categories: IdShard
    behaviors: dict[str, int] = Field(default_factory=lambda: dict(BEHAVIOR_CODES))
    shard_policy: ShardPolicyRecord
    seeds: dict[str, int]
    golden_tolerance: float
    files: dict[Annotated[str, StringConstraints(pattern=PLAIN_FILE_NAME)],
                Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]] = Field(
        description="sha256 of every other file in the bundle, by plain file name inside the bundle directory.",
        json_schema_extra={"propertyNames": {"pattern": PLAIN_FILE_NAME}, "additionalProperties": False})
    build_key: str = Field(default="", description="Hash of everything the bundle was built from; equal keys mean an up-to-date bundle.")
    quantization: Quantization | None = Field(default=None, exclude_if=lambda v: v is None,
                                              description="int8 builds only: budget, measured drift, fallback.")
    quality: QualityGate | None = Field(default=None, exclude_if=lambda v: v is None,
                                        description="The build-time quality gate: validation HR@10 vs popularity.")
    refresh: RefreshRecord | None = Field(default=None, description="On-device refresh of user_state (`build --refresh`), "
                                                                    "null without it.")

    model_config = ConfigDict(populate_by_name=True, protected_namespaces=())

    @model_validator(mode="after")
    def _user_matches_kind(self) -> Manifest:
        if (self.kind == "cold_start") != (self.user_id is None):
            raise ValueError(f"kind {self.kind!r} with user_id {self.user_id!r}: a personal bundle names its user, "
                             "a cold_start bundle has user_id null")
        return self

    def accepts(self, history: EventHistory) -> bool:
        """A personal bundle ranks its own user's history; a cold-start bundle any history (a new
        install, with or without a user id, that has no personal bundle yet)."""
        return self.kind == "cold_start" or history.user_id == self.user_id

    def to_json(self) -> str:
        return compact_json(self.model_dump(by_alias=True, mode="json"))


class GoldenCase(BaseModel):
    name: str
    history: EventHistory
    request_time: int
    candidates: list[int] = Field(description="Global item ids to score.")
    scores: Float32List = Field(
        description="Scores of the full eager model (float32), one per candidate, written in float32's shortest digits.")


class RefreshCase(BaseModel):
    """One full client refresh loop (manifest.refresh) replayed: `state_after` from `state_before` and `events`."""

    name: str
    events: list[Event] = Field(description="The on-device events, oldest first (the program takes the last manifest.refresh.events).")
    state_before: list[float]
    state_after: list[float]
    tolerance: float = Field(description="Max abs difference allowed per state element.")


class RefreshedState(BaseModel):
    """A refreshed user state as persisted beside the history (`tbsm-sdk refresh`, `rank --state`, the
    templates' `<history>.state.json`); a state whose manifest_sha256 is not the open bundle's is ignored."""

    model_config = ConfigDict(extra="forbid")

    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the manifest.json of the bundle it belongs to.")
    user_state: Float32List = Field(description="float32 values, as manifest.user_state.")
    # The templates' refresh trigger (docs/bundle-format.md, on-device refresh); 0, 0 when unknown.
    through_timestamp: int = Field(0, ge=0, description="Timestamp of the newest event the last refresh trained on.")
    through_count: int = Field(0, ge=0, description="How many events of the history had that timestamp then: the events "
                                                    "after this marker count towards refresh.every_events.")

    def to_json(self) -> str:
        return compact_json(self.model_dump(mode="json"))


class GoldenSet(BaseModel):
    tolerance: float
    cases: list[GoldenCase]
    refresh_cases: list[RefreshCase] = Field(default_factory=list, description="Bundles built with --refresh only.")

    def to_json(self) -> str:
        return compact_json(self.model_dump(mode="json"))


# A bundle patch (`build --delta-from OLD`): old bundle + patch = new bundle, byte for byte.
PATCH_SUFFIX = ".patch"  # the patch of bundle directory D is the file D.patch beside it
PATCH_FORMAT_VERSION = 2  # 2: sha256 only for files the new manifest does not cover
PATCH_COPY = 1  # op: u32 offset, u32 length: bytes of the old bundle's file of the same name
PATCH_INSERT = 2  # op: u32 length, then that many literal bytes
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class PatchFile(BaseModel):
    """One file of the new bundle: its ops rebuild exactly `size` bytes."""

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, StringConstraints(pattern=PLAIN_FILE_NAME)]
    size: NonNegativeInt
    sha256: Sha256Hex | None = Field(default=None, description=(
        "Only for a file the new manifest.json does not cover (the signature): manifest.json is checked against "
        "new_manifest_sha256 and every file it lists against its own sha256 there, so repeating those here "
        "would cost ~75 bytes a file of every patch."))


class BundlePatch(BaseModel):
    """The first line of a `.patch` file (compact JSON); the rest of the file is the raw DEFLATE
    (RFC 1951, no zlib header) of the op stream, which rebuilds `files` one after the other
    (docs/bundle-format.md, Patches)."""

    model_config = ConfigDict(extra="forbid")

    patch_format_version: int = PATCH_FORMAT_VERSION
    old_manifest_sha256: Sha256Hex = Field(description="sha256 of the manifest.json the patch applies to.")
    new_manifest_sha256: Sha256Hex = Field(description="sha256 of the manifest.json the patch produces.")
    ops_size: NonNegativeInt = Field(description="Bytes of the inflated op stream (a client inflates no more).")
    files: list[PatchFile] = Field(description="Every file of the new bundle, in the order of the op stream; "
                                               "old files not listed are not part of the new bundle.")

    def to_json(self) -> str:
        return compact_json(self.model_dump(mode="json", exclude_none=True))
