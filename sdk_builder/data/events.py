"""Event-log ingestion: Taobao UserBehavior CSV, generic CSV and Parquet into a columnar EventLog.

Files are read in blocks with pyarrow and validated with vectorised compute kernels, so memory
grows with the number of kept events only (numpy arrays, no per-row Python objects).

Documented ingestion rules:

* Input: plain or gzip-compressed (``.gz``, recognised by its magic bytes) text; other compressed
  or binary files (a NUL byte near the start) are refused with one line. In ``auto`` format a file
  starting with Parquet's magic bytes is Parquet whatever its name.
* Accounting: every data line is counted, so
  ``rows_read == rows_kept + sum(bad_rows) + duplicates_dropped + out_of_range_dropped``.
  Blank lines are not data lines: they are skipped and not counted, but still count for line numbers.
* A bad row is dropped with exactly one reason, the first that applies in this order:
  ``invalid_utf8`` (the line is not UTF-8 text); ``wrong_column_count``; ``non_integer_id`` (user,
  item, category); ``negative_id``; ``unknown_behavior``; ``missing_timestamp`` (null, empty or
  blank); ``non_integer_timestamp``; ``negative_timestamp`` (before 1970).
  Integers may carry surrounding whitespace, leading zeros and a leading ``-`` and must fit in int64;
  each row is judged on its own, whatever else shares its block.
  Behaviour strings are matched case-insensitively after stripping whitespace.
* Then rows with a timestamp outside ``time_range`` = [start, end) are dropped (``out_of_range_dropped``);
  ``parse_time_range`` reads dates as midnight in a given IANA time zone (default UTC).
* Then exact duplicates (equal in all five fields, also across files) are reduced to one row
  (``duplicates_dropped``). Rows that differ in any field, e.g. only in category, are all kept.
* The result is sorted by (user, timestamp, item, behavior, category).
* A column mapping given explicitly must match the file: a CSV whose header lacks a mapped column
  is an error naming it (never read as headerless Taobao instead).
* Positions in messages are ``path:line`` with 1-based physical line numbers (a CSV header is line 1);
  for Parquet the number is the 1-based row.
"""
from __future__ import annotations

import codecs
import csv
import datetime as dt
import gzip
import os
import re
import zlib
import zoneinfo
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pydantic

from sdk_builder.formats import BEHAVIORS  # behaviour code = index + 1; 0 is padding

PathLike = Union[str, os.PathLike]

_FIELDS = ("user", "item", "category", "behavior", "timestamp")
_TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
_SORT_KEYS = ("user", "timestamp", "item", "behavior", "category")
_REASONS = (
    "invalid_utf8",
    "wrong_column_count",
    "non_integer_id",
    "negative_id",
    "unknown_behavior",
    "missing_timestamp",
    "non_integer_timestamp",
    "negative_timestamp",
)
(_INVALID_UTF8, _WRONG_COUNT, _NON_INT_ID, _NEGATIVE_ID, _UNKNOWN_BEHAVIOR, _MISSING_TS, _NON_INT_TS,
 _NEGATIVE_TS) = range(len(_REASONS))
_FORMATS = ("auto", "taobao", "csv", "parquet")
_MAX_EXAMPLES = 5
_CHUNK_BYTES = 32 << 20
_PARQUET_BATCH_ROWS = 1 << 20
# Up to 18 significant digits always fit in int64; 19 fit up to the limits below (equal-length
# digit strings compare like their numbers). Leading zeros are allowed, as Arrow's cast allows them.
_INT_PATTERN = r"^-?0*[0-9]{1,18}$"
_INT19_PATTERN = r"^-?0*[1-9][0-9]{18}$"
_INT64_MAX_DIGITS, _INT64_MIN_DIGITS = str(2**63 - 1), str(2**63)
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_OTHER_COMPRESSION = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd", b"PK\x03\x04": "zip",
                      b"\x04\x22\x4d\x18": "lz4"}
_SNIFF_BYTES = 8192  # a NUL byte this early means binary data, as git and grep decide
_BEHAVIOR_SET = pa.array(BEHAVIORS)
_SECONDS_PER_UNIT = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}


@dataclass(eq=False)
class EventLog:
    """Columnar events, all arrays the same length, sorted by (user, timestamp, item, behavior)."""

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    behavior: np.ndarray
    timestamp: np.ndarray

    def __post_init__(self) -> None:
        lengths = {f.name: len(getattr(self, f.name)) for f in fields(self)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"EventLog columns differ in length: {lengths}")

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask_or_index: np.ndarray) -> EventLog:
        """Rows selected by a boolean mask or an integer index array."""
        return EventLog(*(getattr(self, f.name)[mask_or_index] for f in fields(self)))


def _empty_log() -> EventLog:
    i64 = np.empty(0, np.int64)
    return EventLog(i64, i64.copy(), i64.copy(), np.empty(0, np.int8), i64.copy())


class IngestReport(pydantic.BaseModel):
    """What happened to every row read; see the module docstring for the rules."""

    files: list[str] = pydantic.Field(default_factory=list)
    rows_read: int = 0
    rows_kept: int = 0
    bad_rows: dict[str, int] = pydantic.Field(default_factory=lambda: dict.fromkeys(_REASONS, 0))
    bad_row_examples: dict[str, list[str]] = pydantic.Field(default_factory=dict)
    duplicates_dropped: int = 0
    out_of_range_dropped: int = 0
    time_range: tuple[int, int] | None = None

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{len(self.files)} file(s): {self.rows_read:,} rows read, {self.rows_kept:,} kept",
            f"bad rows: {sum(self.bad_rows.values()):,}",
        ]
        for reason, count in self.bad_rows.items():
            if count:
                examples = ", ".join(self.bad_row_examples.get(reason, []))
                lines.append(f"  {reason}: {count:,} (e.g. {examples})")
        lines.append(f"duplicates dropped: {self.duplicates_dropped:,}")
        if self.time_range is not None:
            start, end = (_utc(t) for t in self.time_range)
            lines.append(
                f"outside [{start}, {end}) UTC dropped: {self.out_of_range_dropped:,}"
            )
        return "\n".join(lines)


def _utc(seconds: int) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


class IngestError(ValueError):
    """Unreadable input; the message is one line naming file, line and field."""


@dataclass
class ColumnMapping:
    """Which source column holds each field of a generic (header or Parquet) log."""

    user: str = "user_id"
    item: str = "item_id"
    category: str = "category_id"
    behavior: str | None = "behavior"  # None: every event is "pv"
    timestamp: str = "timestamp"

    @classmethod
    def parse(cls, spec: str) -> ColumnMapping:
        """Parse "user=uid,item=iid,category=cat,behavior=type,timestamp=ts"; missing keys keep defaults."""
        kwargs: dict[str, str | None] = {}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            key, sep, value = (s.strip() for s in part.partition("="))
            if not sep or key not in _FIELDS:
                raise ValueError(
                    f"column mapping entry {part!r}: expected key=column with key one of {', '.join(_FIELDS)}"
                )
            if not value and key != "behavior":
                raise ValueError(f"column mapping entry {part!r}: {key} needs a column name")
            kwargs[key] = value or None
        return cls(**kwargs)


def _mapped_columns(mapping: ColumnMapping) -> dict[str, str]:
    """field -> source column, leaving out an unmapped behaviour."""
    return {f: getattr(mapping, f) for f in _FIELDS if getattr(mapping, f) is not None}


def parse_time_range(spec: str, tz: str = "UTC") -> tuple[int, int]:
    """Parse "2017-11-25:2017-12-04" (dates at midnight in the IANA zone ``tz``, end exclusive) or
    Unix seconds "1511568000:1512345600" (absolute: ``tz`` does not apply)."""
    zone = parse_time_zone(tz)
    parts = spec.split(":")
    if len(parts) != 2:
        raise ValueError(f"time range {spec!r}: expected START:END")
    start, end = (_parse_instant(p.strip(), spec, zone) for p in parts)
    if start >= end:
        raise ValueError(f"time range {spec!r}: start must be before end")
    return start, end


def parse_time_zone(name: str) -> dt.tzinfo:
    """An IANA time zone ("UTC", "Asia/Shanghai"), or a one-line ValueError."""
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):  # ValueError: a malformed key such as "../x"
        raise ValueError(f"time zone {name!r}: not an IANA time zone name (e.g. UTC, Asia/Shanghai)") from None


def _parse_instant(text: str, spec: str, zone: dt.tzinfo) -> int:
    if re.fullmatch(r"-?[0-9]+", text):
        return int(text)
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"time range {spec!r}: {text!r} is neither a YYYY-MM-DD date nor Unix seconds"
        ) from None
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=zone).timestamp())


def read_taobao_csv(
    path: PathLike | Iterable[PathLike],
    *,
    strict: bool = False,
    time_range: tuple[int, int] | None = None,
) -> tuple[EventLog, IngestReport]:
    """Read headerless user_id,item_id,category_id,behavior,timestamp CSV file(s)."""
    return read_event_log(path, fmt="taobao", strict=strict, time_range=time_range)


def read_event_log(
    path: PathLike | Iterable[PathLike],
    *,
    fmt: str = "auto",
    columns: ColumnMapping | None = None,
    strict: bool = False,
    time_range: tuple[int, int] | None = None,
) -> tuple[EventLog, IngestReport]:
    """Read one or more event logs (formats: auto, taobao, csv, parquet) into one sorted EventLog.

    auto: .parquet/.pq or Parquet's magic bytes is Parquet; a file whose first line is a header
    containing all mapped column names is CSV with header; anything else is Taobao. ``columns``
    applies to csv/parquet; given explicitly, a CSV must have a header holding every mapped column
    (auto never falls back to headerless Taobao then). With ``strict`` the first bad row raises
    IngestError instead of being counted.
    """
    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}")
    if columns is not None and fmt == "taobao":
        raise ValueError("a column mapping applies to csv and parquet input, not to headerless taobao")
    mapping = columns or ColumnMapping()
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    collector = _Collector(strict=strict, time_range=time_range)
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise IngestError(f"{p}: no such file")
        if not p.is_file():
            raise IngestError(f"{p}: not a file")
        kind = _detect_format(p, mapping, explicit=columns is not None) if fmt == "auto" else fmt
        collector.report.files.append(str(p))
        if kind == "parquet":
            _read_parquet(p, mapping, collector)
        else:
            _read_csv(p, mapping if kind == "csv" else None, collector)
    return collector.finish()


def _detect_format(path: Path, mapping: ColumnMapping, *, explicit: bool) -> str:
    if path.suffix.lower() in (".parquet", ".pq"):
        return "parquet"
    with open(path, "rb") as f:
        if f.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC:
            return "parquet"
    if explicit:  # a mapping was given for a header: never guess Taobao (_read_csv names a missing column)
        return "csv"
    with _open_text(path) as f:
        first = _read_or_fail(path, lambda: f.readline(1 << 16))
    try:
        header = set(_split_header(path, first))
    except IngestError:
        return "taobao"  # not a header: the Taobao reader reports what is wrong with the line
    wanted = list(_mapped_columns(mapping).values())
    if header.isdisjoint(wanted):  # data (Taobao rows start with digits), not a header
        return "taobao"
    return "csv"  # a header naming some of the columns: _read_csv names the first missing one


def _open_text(path: Path) -> BinaryIO:
    """The file's bytes, gunzipped if it is gzip; other compressed or binary data is refused."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(_GZIP_MAGIC):
        f = gzip.open(path, "rb")
        try:
            head = _read_or_fail(path, lambda: f.read(_SNIFF_BYTES))
            f.seek(0)
        except BaseException:
            f.close()
            raise
    else:
        for magic, name in _OTHER_COMPRESSION.items():
            if head.startswith(magic):
                raise IngestError(f"{path}: {name}-compressed; decompress it first (plain and .gz text are read)")
        f = open(path, "rb")
    nul = head.find(b"\x00")
    if nul >= 0 and head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        f.close()
        raise IngestError(f"{path}: UTF-16 text; convert it to UTF-8 first")
    if nul >= 0:
        f.close()
        line = head.count(b"\n", 0, nul) + 1
        raise IngestError(f"{path}:{line}: binary data (a NUL byte), not a text event log")
    return f


def _read_or_fail(path: Path, read: Callable[[], bytes]) -> bytes:
    try:
        return read()
    except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz, or an I/O error
        raise IngestError(f"{path}: cannot read: {_first_line(str(e)) or type(e).__name__}") from None


def _split_header(path: Path, line: bytes) -> list[str]:
    text = line.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    try:
        return [name.strip() for name in next(csv.reader([text]), [])]
    except csv.Error as e:  # e.g. a bare carriage return
        raise IngestError(f"{path}:1: header line not understood ({e})") from None


# ---------------------------------------------------------------------------------------------
# Validation and accumulation


@dataclass
class _Rejected:
    """Lines that produced no row because they are bad (not UTF-8, wrong column count)."""

    lines: dict[int, list[int]] = field(default_factory=dict)  # reason -> absolute line numbers, ascending
    first: list[tuple[int, str]] = field(default_factory=list)  # (line, message), the first few per reason

    def add(self, reason: int, line: int, message: str) -> None:
        have = self.lines.setdefault(reason, [])
        have.append(line)
        if len(have) <= _MAX_EXAMPLES:
            self.first.append((line, message))

    def count(self) -> int:
        return sum(map(len, self.lines.values()))

    def all_lines(self) -> np.ndarray:
        return np.sort(np.concatenate([np.array(v, np.int64) for v in self.lines.values()] or [np.empty(0, np.int64)]))


class _Collector:
    """Validates blocks, keeps good rows as numpy arrays and fills the report."""

    def __init__(self, *, strict: bool, time_range: tuple[int, int] | None) -> None:
        self.strict = strict
        self.time_range = None if time_range is None else (int(time_range[0]), int(time_range[1]))
        self.report = IngestReport(time_range=self.time_range)
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in _FIELDS}

    def add(
        self,
        path: Path,
        cols: dict[str, pa.Array],
        names: dict[str, str],
        row_line: Callable[[np.ndarray], np.ndarray],
        rejected: _Rejected,
    ) -> None:
        """Account for one block: ``cols`` maps field -> raw column, ``names`` field -> source name."""
        n = len(cols["user"])
        self.report.rows_read += n + rejected.count()
        try:
            values, checks = _validate(cols, n)
        except (TypeError, pa.ArrowException) as e:
            raise IngestError(f"{path}: {_first_line(str(e))}") from None
        reason = np.zeros(n, np.int8)  # 0 = good, else 1 + index into _REASONS
        for _, bad, r in checks:
            if bad is not None:
                reason[bad & (reason == 0)] = r + 1
        bad_rows = np.flatnonzero(reason)
        if len(bad_rows) or rejected.lines:
            self._record_bad(path, cols, names, row_line, rejected, checks, reason, bad_rows)
        keep = reason == 0 if len(bad_rows) else None
        if self.time_range is not None:
            ts = values["timestamp"]
            outside = (ts < self.time_range[0]) | (ts >= self.time_range[1])
            if keep is not None:
                outside &= keep
            self.report.out_of_range_dropped += int(outside.sum())
            keep = ~outside if keep is None else keep & ~outside
        for f in _FIELDS:
            self.parts[f].append(values[f] if keep is None else values[f][keep])

    def _record_bad(
        self,
        path: Path,
        cols: dict[str, pa.Array],
        names: dict[str, str],
        row_line: Callable[[np.ndarray], np.ndarray],
        rejected: _Rejected,
        checks: list[tuple[str, np.ndarray | None, int]],
        reason: np.ndarray,
        bad_rows: np.ndarray,
    ) -> None:
        if self.strict:
            candidates = list(rejected.first)
            if len(bad_rows):
                i = int(bad_rows[0])
                candidates.append((int(row_line(bad_rows[:1])[0]), _describe(i, cols, names, checks)))
            line, message = min(candidates)
            raise IngestError(f"{path}:{line}: {message}")
        counts = np.bincount(reason[bad_rows], minlength=len(_REASONS) + 1)
        for r, lines in rejected.lines.items():
            self.report.bad_rows[_REASONS[r]] += len(lines)
        for r in range(len(_REASONS)):
            self.report.bad_rows[_REASONS[r]] += int(counts[r + 1])
        examples = self.report.bad_row_examples
        lines_by_reason = {r: lines[:_MAX_EXAMPLES] for r, lines in rejected.lines.items()}
        for r in np.unique(reason[bad_rows]):
            first = bad_rows[reason[bad_rows] == r][:_MAX_EXAMPLES]
            lines_by_reason[int(r) - 1] = row_line(first).tolist()
        for r, lines in lines_by_reason.items():
            have = examples.setdefault(_REASONS[r], [])
            have.extend(f"{path}:{line}" for line in lines[: _MAX_EXAMPLES - len(have)])
            if not have:
                del examples[_REASONS[r]]

    def finish(self) -> tuple[EventLog, IngestReport]:
        """Concatenate, sort, drop exact duplicates."""
        if not self.parts["user"]:
            return _empty_log(), self.report
        # The blocks live in Arrow's pool, which keeps freed pages; hand them back to the OS after
        # each column so joining does not double the peak RSS.
        joined = {}
        for f in _FIELDS:
            joined[f] = np.concatenate(self.parts.pop(f))
            pa.default_memory_pool().release_unused()
        log = EventLog(**joined)
        del joined
        order = _sort_order(log)
        for f in _FIELDS:
            setattr(log, f, getattr(log, f)[order])
        del order
        dup = np.zeros(len(log), bool)
        if len(log) > 1:
            same = np.ones(len(log) - 1, bool)
            for f in _FIELDS:
                col = getattr(log, f)
                same &= col[1:] == col[:-1]
            dup[1:] = same
        n_dup = int(dup.sum())
        if n_dup:
            for f in _FIELDS:
                setattr(log, f, getattr(log, f)[~dup])
        self.report.duplicates_dropped = n_dup
        self.report.rows_kept = len(log)
        return log, self.report


def _sort_order(log: EventLog) -> np.ndarray:
    # Arrow's multi-key sort is stable and several times faster than np.lexsort on 10M rows;
    # with all five fields as keys only identical rows tie, so the order is deterministic.
    table = pa.table({f: getattr(log, f) for f in _SORT_KEYS})
    return pc.sort_indices(table, sort_keys=[(f, "ascending") for f in _SORT_KEYS]).to_numpy()


def _validate(
    cols: dict[str, pa.Array], n: int
) -> tuple[dict[str, np.ndarray], list[tuple[str, np.ndarray | None, int]]]:
    """Parsed values per field and the (field, bad mask, reason) checks in priority order."""
    values: dict[str, np.ndarray] = {}
    checks: list[tuple[str, np.ndarray | None, int]] = []
    for f in ("user", "item", "category"):
        values[f], bad = _to_int64(cols[f])
        checks.append((f, bad, _NON_INT_ID))
    for f in ("user", "item", "category"):
        checks.append((f, _negative(values[f]), _NEGATIVE_ID))
    if "behavior" in cols:
        values["behavior"], bad = _behavior_codes(cols["behavior"])
        checks.append(("behavior", bad, _UNKNOWN_BEHAVIOR))
    else:
        values["behavior"] = np.ones(n, np.int8)
    values["timestamp"], missing, non_int = _timestamps(cols["timestamp"])
    checks += [("timestamp", missing, _MISSING_TS), ("timestamp", non_int, _NON_INT_TS),
               ("timestamp", _negative(values["timestamp"]), _NEGATIVE_TS)]
    return values, checks


def _negative(values: np.ndarray) -> np.ndarray | None:
    # Values of rows already bad for another reason are 0 here, so they never count twice.
    mask = values < 0
    return mask if mask.any() else None


def _describe(
    i: int,
    cols: dict[str, pa.Array],
    names: dict[str, str],
    checks: list[tuple[str, np.ndarray | None, int]],
) -> str:
    """Message for bad row ``i``: its first failing field and value."""
    f, _, r = next(c for c in checks if c[1] is not None and c[1][i])
    value = cols[f][i].as_py()
    shown = "null" if value is None else _shown(value)
    if r == _UNKNOWN_BEHAVIOR:
        problem = f"{shown} is not one of {', '.join(BEHAVIORS)}"
    elif r == _MISSING_TS:
        problem = "missing"
    elif r in (_NEGATIVE_ID, _NEGATIVE_TS):
        problem = f"{shown} is negative"
    else:
        problem = f"{shown} is not an integer"
    return f"field '{names[f]}': {problem}"


def _to_numpy(arr: pa.Array) -> np.ndarray:
    if arr.null_count:
        arr = pc.fill_null(arr, 0)
    return arr.to_numpy(zero_copy_only=False)


def _null_mask(arr: pa.Array) -> np.ndarray | None:
    if not arr.null_count:
        return None
    return pc.is_null(arr).to_numpy(zero_copy_only=False)


def _to_int64(col: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 values and the mask of entries that are not integers (None when all are)."""
    t = col.type
    if pa.types.is_integer(t):
        return _to_numpy(pc.cast(col, pa.int64())), _null_mask(col)
    if pa.types.is_floating(t):
        x = _to_numpy(col).astype(np.float64)
        ok = np.isfinite(x) & (x == np.floor(x)) & (np.abs(x) < 2.0**63)
        if col.null_count:
            ok &= ~_null_mask(col)
        return np.where(ok, x, 0).astype(np.int64), None if ok.all() else ~ok
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            arr = pc.cast(col, pa.int64())
        except pa.ArrowInvalid:
            # Rare path: find the unparseable entries without failing the whole block.
            trimmed = pc.utf8_trim_whitespace(col)
            ok = pc.fill_null(pc.match_substring_regex(trimmed, _INT_PATTERN), False)
            long = pc.fill_null(pc.match_substring_regex(trimmed, _INT19_PATTERN), False)
            if pc.any(long).as_py():
                digits = pc.utf8_ltrim(trimmed, characters="-0")
                limit = pc.if_else(pc.starts_with(trimmed, "-"), _INT64_MIN_DIGITS, _INT64_MAX_DIGITS)
                ok = pc.or_(ok, pc.and_(long, pc.fill_null(pc.less_equal(digits, limit), False)))
            arr = pc.cast(pc.if_else(ok, trimmed, pa.scalar(None, t)), pa.int64())
        return _to_numpy(arr), _null_mask(arr)
    raise TypeError(f"unsupported column type {t} for an integer field")


def _behavior_codes(col: pa.Array) -> tuple[np.ndarray, np.ndarray | None]:
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        col = pc.cast(col, pa.string())
    index = pc.index_in(col, value_set=_BEHAVIOR_SET)
    if index.null_count:
        index = pc.index_in(pc.utf8_lower(pc.utf8_trim_whitespace(col)), value_set=_BEHAVIOR_SET)
    return (_to_numpy(index) + 1).astype(np.int8), _null_mask(index)


def _timestamps(col: pa.Array) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Unix seconds, the mask of missing values and the mask of non-integer values."""
    if pa.types.is_timestamp(col.type):
        raw = _to_numpy(pc.cast(col, pa.int64()))
        return raw // _SECONDS_PER_UNIT[col.type.unit], _null_mask(col), None
    values, bad = _to_int64(col)
    if bad is None:
        return values, None, None
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        blank = pc.equal(pc.utf8_trim_whitespace(col), "")
        missing = pc.fill_null(blank, True).to_numpy(zero_copy_only=False)
    else:
        missing = pc.is_null(col).to_numpy(zero_copy_only=False)
    missing &= bad
    non_int = bad & ~missing
    return values, missing if missing.any() else None, non_int if non_int.any() else None


def _shown(value: object, limit: int = 60) -> str:
    """A value for a one-line message: repr (control characters escaped), long ones cut."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _names(columns: list[str], limit: int = 12) -> str:
    shown = [_printable(c, 30) for c in columns[:limit]]
    return ", ".join(shown) + (f", ... ({len(columns)} in all)" if len(columns) > limit else "")


def _printable(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(text: str) -> str:
    """The first line of a library's message, control characters escaped (it may quote raw input)."""
    lines = text.strip().splitlines()
    return _printable(lines[0], 200) if lines else text


# ---------------------------------------------------------------------------------------------
# Readers


def _read_csv(path: Path, mapping: ColumnMapping | None, collector: _Collector) -> None:
    """Taobao (mapping None: headerless, fixed columns, no quoting) or CSV with a header row."""
    with _open_text(path) as f:
        if mapping is None:
            column_names = list(_TAOBAO_COLUMNS)
            names = dict(zip(_FIELDS, _TAOBAO_COLUMNS))
            next_line = 1
        else:
            header_line = _read_or_fail(path, f.readline)
            if not header_line:
                return
            column_names = _split_header(path, header_line)
            names = _mapped_columns(mapping)
            absent = [c for c in names.values() if c not in column_names]
            if absent:
                raise IngestError(f"{path}:1: header has no column {absent[0]!r} (columns: {_names(column_names)})")
            next_line = 2
        include = list(dict.fromkeys(names.values()))
        chunks = _line_chunks(f, strip_bom=mapping is None)
        while (chunk := _read_or_fail(path, lambda: next(chunks, b""))):
            n_lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
            # A line that is not UTF-8 is blanked (it stays a line, so later line numbers hold) and
            # counted, rather than failing the whole block in pyarrow's string conversion.
            chunk, not_utf8 = _blank_invalid_utf8(chunk)
            table, rejected = _parse_chunk(
                path, chunk, next_line, column_names, include, quoted=mapping is not None
            )
            wrong_count = len(rejected.lines.get(_WRONG_COUNT, ()))
            if table.num_rows + wrong_count != n_lines:
                # pyarrow also ends rows at a bare '\r'; line numbers would no longer be exact.
                raise IngestError(
                    f"{path}:{next_line}: line structure not understood near lines "
                    f"{next_line}-{next_line + n_lines - 1} (bare carriage return?)"
                )
            skipped = rejected.all_lines() - (next_line - 1)  # the lines that produced no row
            for line, position in not_utf8:  # now blank lines, dropped with the others below
                rejected.add(_INVALID_UTF8, next_line - 1 + line, f"not UTF-8 text (byte {position + 1} of the line)")
            # A blank line arrives as a row of empty strings, so only scan bytes when one could exist.
            user = table.column(names["user"])
            maybe_blank = pc.any(pc.equal(pc.binary_length(user), 0)).as_py()
            blank = _blank_lines(chunk) if maybe_blank else np.empty(0, np.int64)
            if len(blank):
                blank_rows = blank - 1 - np.searchsorted(skipped, blank)
                table = table.filter(~np.isin(np.arange(table.num_rows), blank_rows))
                skipped = np.union1d(skipped, blank)
            cols = {f: _single_array(table.column(c)) for f, c in names.items()}
            collector.add(path, cols, names, _row_line_mapper(skipped, next_line - 1), rejected)
            next_line += n_lines


def _blank_invalid_utf8(chunk: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """The chunk with every line that is not valid UTF-8 emptied, and (1-based line, byte offset in
    the line) of each such line."""
    if chunk.isascii():
        return chunk, []
    view = memoryview(chunk)
    bad: list[tuple[int, int]] = []
    kept: list[memoryview] = []
    pos = line = 0  # pos: start of an unchecked line; line: its 0-based number
    while pos < len(chunk):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as e:
            at = pos + e.start
            start = chunk.rfind(b"\n", pos, at) + 1 or pos
            end = chunk.find(b"\n", at)
            end = len(chunk) if end < 0 else end
            line += chunk.count(b"\n", pos, start)
            bad.append((line + 1, at - start))
            kept.append(view[pos:start])
            pos = end  # keep the newline itself: the line stays, empty
    if not bad:
        return chunk, []
    kept.append(view[pos:])
    return b"".join(kept), bad


def _line_chunks(f: BinaryIO, *, strip_bom: bool) -> Iterator[bytes]:
    """Blocks of whole lines, about _CHUNK_BYTES each."""
    carry = b""
    first = True
    while True:
        buf = f.read(_CHUNK_BYTES)
        if first and strip_bom and buf.startswith(b"\xef\xbb\xbf"):
            buf = buf[3:]
        first = False
        if not buf:
            if carry:
                yield carry
            return
        buf = carry + buf
        cut = buf.rfind(b"\n") + 1
        if cut:
            yield buf[:cut]
        carry = buf[cut:]


def _parse_chunk(
    path: Path,
    chunk: bytes,
    first_line: int,
    column_names: list[str],
    include: list[str],
    *,
    quoted: bool,
) -> tuple[pa.Table, _Rejected]:
    rejected = _Rejected()

    def on_invalid(row: pcsv.InvalidRow) -> str:
        line = first_line - 1 + row.number
        rejected.add(_WRONG_COUNT, line, f"expected {row.expected_columns} fields, got {row.actual_columns}: {_shown(row.text)}")
        return "skip"

    try:
        table = pcsv.read_csv(
            pa.BufferReader(chunk),
            # Serial parsing: only then does pyarrow report line numbers of skipped rows.
            read_options=pcsv.ReadOptions(
                column_names=column_names, use_threads=False, block_size=max(len(chunk), 1 << 20)
            ),
            parse_options=pcsv.ParseOptions(
                quote_char='"' if quoted else False,
                ignore_empty_lines=False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in include}, include_columns=include
            ),
        )
    except pa.ArrowException as e:
        last = first_line + chunk.count(b"\n")
        raise IngestError(f"{path}:{first_line}: lines {first_line}-{last}: {_first_line(str(e))}") from None
    for lines in rejected.lines.values():
        lines.sort()
    rejected.first.sort()
    return table, rejected


def _blank_lines(chunk: bytes) -> np.ndarray:
    """1-based line numbers (within the chunk) of empty lines."""
    buf = np.frombuffer(chunk, np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate(([0], ends + 1))[: len(ends)]
    length = ends - starts
    blank = (length == 0) | ((length == 1) & (buf[starts] == ord("\r")))
    return np.flatnonzero(blank) + 1


def _row_line_mapper(skipped: np.ndarray, offset: int) -> Callable[[np.ndarray], np.ndarray]:
    """Map block row indices to file lines, given the sorted chunk lines that produced no row."""
    # The k-th (0-based) skipped line s follows s - 1 - k kept lines, so the r-th (1-based) kept
    # line lies after every skipped line with s - k <= r.
    threshold = skipped - np.arange(len(skipped))

    def row_line(rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64) + 1
        return offset + rows + np.searchsorted(threshold, rows, side="right")

    return row_line


def _single_array(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _read_parquet(path: Path, mapping: ColumnMapping, collector: _Collector) -> None:
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise IngestError(f"{path}: not a readable Parquet file: {_first_line(str(e))}") from None
    names = _mapped_columns(mapping)
    available = pf.schema_arrow.names
    absent = [c for c in names.values() if c not in available]
    if absent:
        raise IngestError(f"{path}: no column {absent[0]!r} (columns: {_names(available)})")
    rows_before = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(dict.fromkeys(names.values()))):
        cols = {f: batch.column(c) for f, c in names.items()}
        collector.add(path, cols, names, _row_line_mapper(np.empty(0, np.int64), rows_before), _Rejected())
        rows_before += batch.num_rows
