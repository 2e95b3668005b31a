"""Tests for event-log ingestion (sdk_builder.events) and the synthetic generator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdk_builder.data import events
from sdk_builder.data.events import (
    BEHAVIORS,
    ColumnMapping,
    EventLog,
    IngestError,
    IngestReport,
    parse_time_range,
    read_event_log,
    read_taobao_csv,
)
from sdk_builder.data.synthetic import generate_taobao_events, write_taobao_csv

FIELDS = ("user", "item", "category", "behavior", "timestamp")
ML_SMALL = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-latest-small" / "UserBehavior.csv"
)
T0 = 1511570000


def assert_logs_equal(a: EventLog, b: EventLog) -> None:
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
        assert getattr(a, f).dtype == getattr(b, f).dtype, f


def accounted(report: IngestReport) -> int:
    return (
        report.rows_kept
        + sum(report.bad_rows.values())
        + report.duplicates_dropped
        + report.out_of_range_dropped
    )


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def row(user: int, item: int, ts: int, behavior: str = "pv", category: int = 100) -> str:
    return f"{user},{item},{category},{behavior},{ts}"


@pytest.fixture(scope="module")
def small_events() -> EventLog:
    return generate_taobao_events(300, n_items=2_000, n_categories=30, seed=3)


# A file with one bad row of each kind at known lines, after an empty line and a 6-field line.
MESSY = [
    row(1, 10, T0),  # 1
    "",  # 2: blank, not a data line
    row(1, 10, T0 + 1) + ",extra",  # 3: wrong_column_count
    row(2, 11, T0 + 2, "buy"),  # 4
    "2,abc,100,pv,1511570003",  # 5: non_integer_id
    row(3, 12, T0 + 4, "click"),  # 6: unknown_behavior
    "3,12,100,pv,",  # 7: missing_timestamp
    "3,12,100,pv,soon",  # 8: non_integer_timestamp
    row(4, 13, T0 + 5, " CART "),  # 9: fine (case and whitespace)
    "5,14",  # 10: wrong_column_count
    "",  # 11: blank
    "x,y,z,click,",  # 12: non_integer_id wins over the later problems
    row(6, 15, T0 + 6, "Fav", category=102),  # 13
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bad_rows_counted_with_lines(tmp_path: Path, newline: str) -> None:
    path = write_lines(tmp_path / "messy.csv", MESSY, newline)
    log, report = read_taobao_csv(path)
    p = str(path)
    assert report.bad_rows == {
        "wrong_column_count": 2,
        "non_integer_id": 2,
        "unknown_behavior": 1,
        "missing_timestamp": 1,
        "non_integer_timestamp": 1,
    }
    assert report.bad_row_examples == {
        "wrong_column_count": [f"{p}:3", f"{p}:10"],
        "non_integer_id": [f"{p}:5", f"{p}:12"],
        "unknown_behavior": [f"{p}:6"],
        "missing_timestamp": [f"{p}:7"],
        "non_integer_timestamp": [f"{p}:8"],
    }
    assert report.rows_read == 11
    assert report.rows_kept == 4 == len(log)
    assert accounted(report) == report.rows_read
    np.testing.assert_array_equal(log.user, [1, 2, 4, 6])
    np.testing.assert_array_equal(log.behavior, [1, 2, 3, 4])
    np.testing.assert_array_equal(log.category, [100, 100, 100, 102])
    assert "non_integer_id: 2" in report.summary()


def test_line_numbers_exact_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "_CHUNK_BYTES", 1_000)  # ~30 lines per chunk
    monkeypatch.setattr(events, "_MAX_EXAMPLES", 10_000)  # so every bad line is listed
    rng = np.random.default_rng(7)
    lines = [row(u, 1000 + u, T0 + u) for u in range(1, 2001)]
    bad_at = sorted(rng.choice(np.arange(1, 2001), 400, replace=False).tolist())
    expected: dict[str, list[int]] = {"wrong_column_count": [], "non_integer_id": [], "unknown_behavior": []}
    for k, line_no in enumerate(bad_at):
        kind = ("blank", "wrong_column_count", "non_integer_id", "unknown_behavior")[k % 4]
        lines[line_no - 1] = {
            "blank": "",
            "wrong_column_count": "1,2,3,pv,4,5",
            "non_integer_id": "1,2.5,3,pv,4",
            "unknown_behavior": "1,2,3,view,4",
        }[kind]
        if kind != "blank":
            expected[kind].append(line_no)
    path = write_lines(tmp_path / "many.csv", lines)
    _, report = read_taobao_csv(path)
    for reason, line_nos in expected.items():
        assert report.bad_rows[reason] == len(line_nos)
        assert report.bad_row_examples[reason] == [f"{path}:{n}" for n in line_nos]
    assert report.rows_read == 2000 - 100  # blank lines are not data lines
    assert accounted(report) == report.rows_read


def test_strict_raises_first_bad_row(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "messy.csv", MESSY)
    with pytest.raises(IngestError) as info:
        read_taobao_csv(path, strict=True)
    message = str(info.value)
    assert message.startswith(f"{path}:3: ") and "6" in message and "\n" not in message

    # A bad value before a wrong column count in the same block is reported first.
    path = write_lines(tmp_path / "order.csv", [row(1, 1, T0), "1,abc,3,pv,5", "1,2", row(2, 2, T0)])
    with pytest.raises(IngestError, match=r"order\.csv:2: field 'item_id': 'abc' is not an integer$"):
        read_taobao_csv(path, strict=True)

    path = write_lines(tmp_path / "ts.csv", [row(1, 1, T0), "1,2,3,pv, "])
    with pytest.raises(IngestError, match=r"ts\.csv:2: field 'timestamp': missing$"):
        read_taobao_csv(path, strict=True)

    good = write_lines(tmp_path / "good.csv", [row(1, 1, T0)])
    assert len(read_taobao_csv(good, strict=True)[0]) == 1


def test_duplicates_and_time_range(tmp_path: Path) -> None:
    start, end = parse_time_range("2017-11-25:2017-12-04")
    inside = [row(1, 10, start), row(1, 11, start + 5), row(2, 10, end - 1)]
    a = write_lines(
        tmp_path / "a.csv",
        inside
        + [
            row(1, 10, start),  # duplicate within the file
            row(1, 10, start, "buy"),  # differs in behaviour: kept
            row(1, 10, start, category=101),  # differs in category only: kept
            row(3, 10, start - 1),  # before the range
            row(3, 10, end),  # end is exclusive
            row(3, 10, end),  # duplicate outside the range counts as out of range
        ],
    )
    b = write_lines(tmp_path / "b.csv", [row(2, 10, end - 1), row(4, 12, start + 9)])  # one duplicate across files
    log, report = read_taobao_csv([a, b], time_range=(start, end))
    assert report.files == [str(a), str(b)]
    assert report.time_range == (start, end)
    assert report.out_of_range_dropped == 3
    assert report.duplicates_dropped == 2
    assert report.rows_read == 11 and report.rows_kept == 6 == len(log)
    assert accounted(report) == report.rows_read
    assert sum(report.bad_rows.values()) == 0
    assert ((log.timestamp >= start) & (log.timestamp < end)).all()
    keys = list(zip(*(getattr(log, f).tolist() for f in FIELDS)))
    assert len(set(keys)) == len(keys)
    assert "duplicates dropped: 2" in report.summary()


def test_accounting_identity_on_corrupted_log(
    tmp_path: Path, small_events: EventLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "_CHUNK_BYTES", 64 << 10)
    clean = tmp_path / "clean.csv"
    write_taobao_csv(small_events, clean)
    lines = clean.read_text().splitlines()
    rng = np.random.default_rng(11)
    corrupt = rng.choice(len(lines), 200, replace=False)
    for k, i in enumerate(corrupt):
        lines[i] = ("", "1,2", "a,b,c,pv,1", "1,2,3,zap,1", "1,2,3,pv,")[k % 5]
    duplicated = rng.choice(np.setdiff1d(np.arange(len(lines)), corrupt), 50, replace=False)
    lines += [lines[i] for i in duplicated]
    path = write_lines(tmp_path / "corrupt.csv", lines)
    start, end = int(np.median(small_events.timestamp)), int(small_events.timestamp.max()) + 1
    log, report = read_taobao_csv(path, time_range=(start, end))
    assert report.rows_read == len(lines) - 40
    assert sum(report.bad_rows.values()) == 160
    assert accounted(report) == report.rows_read
    assert report.out_of_range_dropped > 0 and report.duplicates_dropped > 0
    order = np.lexsort((log.behavior, log.item, log.timestamp, log.user))
    np.testing.assert_array_equal(order, np.arange(len(log)))


def test_round_trip(tmp_path: Path, small_events: EventLog) -> None:
    path = tmp_path / "events.csv"
    write_taobao_csv(small_events, path, chunk_rows=1_000)
    assert path.read_text().splitlines()[0].count(",") == 4
    log, report = read_taobao_csv(path)
    assert_logs_equal(log, small_events)
    assert report.rows_read == report.rows_kept == len(small_events)
    assert sum(report.bad_rows.values()) == 0 and report.bad_row_examples == {}
    auto_log, _ = read_event_log(path)
    assert_logs_equal(auto_log, small_events)


def test_generic_csv_with_mapping_and_header(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "generic.csv",
        [
            'ts,"uid",iid,cat,type,note',
            f'{T0 + 5},7,70,700,Cart,"hello, world"',
            f"{T0},7,71,700,pv,",
            f"{T0},8,72,701,fav,x,y",  # 7 fields
            "",
            f"{T0 + 1},8,xx,701,buy,",  # bad item on line 6
            f" {T0 + 2} , 8 ,73,701,buy,",  # whitespace around integers is accepted
        ],
    )
    mapping = ColumnMapping.parse("user=uid, item=iid,category=cat,behavior=type,timestamp=ts")
    log, report = read_event_log(path, columns=mapping)  # auto-detects the header
    np.testing.assert_array_equal(log.user, [7, 7, 8])
    np.testing.assert_array_equal(log.item, [71, 70, 73])
    np.testing.assert_array_equal(log.behavior, [1, 3, 2])
    np.testing.assert_array_equal(log.timestamp, [T0, T0 + 5, T0 + 2])
    assert report.bad_row_examples == {
        "wrong_column_count": [f"{path}:4"],
        "non_integer_id": [f"{path}:6"],
    }
    assert accounted(report) == report.rows_read == 5

    no_behavior = ColumnMapping.parse("user=uid,item=iid,category=cat,timestamp=ts,behavior=")
    log, _ = read_event_log(path, fmt="csv", columns=no_behavior)
    assert (log.behavior == 1).all()

    with pytest.raises(IngestError, match=r"generic\.csv:1: header has no column 'user_id'"):
        read_event_log(path, fmt="csv")
    with pytest.raises(IngestError, match=r"generic\.csv:4: expected 6 fields, got 7"):
        read_event_log(path, columns=mapping, strict=True)
    bad_item = write_lines(tmp_path / "item.csv", ["uid,iid,cat,type,ts", f"1,2,3,pv,{T0}", f"1,xx,3,pv,{T0}"])
    with pytest.raises(IngestError, match=r"item\.csv:3: field 'iid': 'xx' is not an integer$"):
        read_event_log(bad_item, columns=mapping, strict=True)


def test_parquet_with_mapping(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    table = pa.table(
        {
            "uid": pa.array([3, 1, 1, None, 2], pa.int32()),
            "iid": pa.array(["30", "10", "11", "12", "20"]),
            "cat": pa.array([300, 100, 100, 100, 200], pa.int64()),
            "type": pa.array(["pv", "buy", "PV", "pv", "Fav"]).dictionary_encode(),
            "ts": pa.array(
                [(T0 + k) * 1000 + 999 for k in range(5)], pa.timestamp("ms", tz="UTC")
            ),
        }
    )
    pq.write_table(table, path)
    mapping = ColumnMapping(user="uid", item="iid", category="cat", behavior="type", timestamp="ts")
    log, report = read_event_log(path, columns=mapping)
    np.testing.assert_array_equal(log.user, [1, 1, 2, 3])
    np.testing.assert_array_equal(log.item, [10, 11, 20, 30])
    np.testing.assert_array_equal(log.behavior, [2, 1, 4, 1])
    np.testing.assert_array_equal(log.timestamp, [T0 + 1, T0 + 2, T0 + 4, T0])
    assert log.user.dtype == np.int64 and log.timestamp.dtype == np.int64
    assert report.bad_rows["non_integer_id"] == 1
    assert report.bad_row_examples == {"non_integer_id": [f"{path}:4"]}
    assert accounted(report) == report.rows_read == 5
    with pytest.raises(IngestError, match="no column 'user_id'"):
        read_event_log(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    log, report = read_taobao_csv(empty)
    assert len(log) == 0 and log.user.dtype == np.int64 and log.behavior.dtype == np.int8
    assert report.rows_read == 0 and report.files == [str(empty)]
    blank = write_lines(tmp_path / "blank.csv", ["", ""])
    assert len(read_event_log(blank)[0]) == 0
    header_only = write_lines(tmp_path / "header.csv", ["user_id,item_id,category_id,behavior,timestamp"])
    assert len(read_event_log(header_only)[0]) == 0
    missing = tmp_path / "nope.csv"
    with pytest.raises(IngestError, match="nope.csv: no such file"):
        read_taobao_csv(missing)
    with pytest.raises(ValueError, match="unknown format"):
        read_event_log(empty, fmt="json")


def test_column_mapping_and_time_range_parsing() -> None:
    assert ColumnMapping.parse("") == ColumnMapping()
    m = ColumnMapping.parse("user=uid,behavior=")
    assert (m.user, m.item, m.behavior) == ("uid", "item_id", None)
    for bad in ("user", "colour=red", "item="):
        with pytest.raises(ValueError):
            ColumnMapping.parse(bad)
    assert parse_time_range("2017-11-25:2017-12-04") == (1511568000, 1512345600)
    assert parse_time_range("1511568000:1512345600") == (1511568000, 1512345600)
    for bad in ("2017-11-25", "2017-12-04:2017-11-25", "yesterday:today"):
        with pytest.raises(ValueError):
            parse_time_range(bad)


def test_event_log_take(small_events: EventLog) -> None:
    mask = small_events.behavior == 1
    sub = small_events.take(mask)
    assert len(sub) == int(mask.sum())
    np.testing.assert_array_equal(sub.item, small_events.item[mask])
    np.testing.assert_array_equal(small_events.take(np.array([2, 0])).user, small_events.user[[2, 0]])


def test_generator_is_deterministic_and_shaped(small_events: EventLog) -> None:
    again = generate_taobao_events(300, n_items=2_000, n_categories=30, seed=3)
    assert_logs_equal(again, small_events)
    other = generate_taobao_events(300, n_items=2_000, n_categories=30, seed=4)
    assert not np.array_equal(other.item[:100], small_events.item[:100])

    e = small_events
    start, days = 1511568000, 9
    assert ((e.timestamp >= start) & (e.timestamp < start + days * 86_400)).all()
    same_user = e.user[1:] == e.user[:-1]
    assert (e.user[1:] >= e.user[:-1]).all()
    assert (e.timestamp[1:][same_user] > e.timestamp[:-1][same_user]).all()
    _, per_user = np.unique(e.user, return_counts=True)
    assert len(per_user) == 300 and per_user.min() >= 20 and per_user.max() <= 120
    assert e.user.max() > 10 * 300 and e.item.max() > 10 * 2_000  # ids are sparse
    pairs = np.unique(np.stack([e.item, e.category]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # one category per item
    share = np.bincount(e.behavior, minlength=5)[1:] / len(e)
    assert set(np.unique(e.behavior)) <= set(range(1, len(BEHAVIORS) + 1))
    assert share[0] > 0.8 and (share[1:] > 0).all()
    # Sequential structure: the next event usually stays in the current category.
    assert np.mean(e.category[1:][same_user] == e.category[:-1][same_user]) > 0.6


def test_ml_latest_small() -> None:
    if not ML_SMALL.is_file():
        pytest.skip(f"{ML_SMALL} not available")
    log, report = read_taobao_csv(ML_SMALL)
    assert report.rows_kept == len(log) == 100_836
    assert sum(report.bad_rows.values()) == 0
    assert report.duplicates_dropped == 0 and report.out_of_range_dropped == 0
    assert len(np.unique(log.user)) == 610
    assert len(np.unique(log.category)) == 19
    assert (log.behavior == 1).all()
