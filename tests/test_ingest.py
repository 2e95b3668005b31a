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
    row(7, -15, T0 + 7),  # 14: negative_id
    row(7, 15, -1),  # 15: negative_timestamp
    "-7,15,100,pv,-1",  # 16: negative_id wins over negative_timestamp
]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_bad_rows_counted_with_lines(tmp_path: Path, newline: str) -> None:
    path = write_lines(tmp_path / "messy.csv", MESSY, newline)
    log, report = read_taobao_csv(path)
    p = str(path)
    assert report.bad_rows == {
        "invalid_utf8": 0,
        "wrong_column_count": 2,
        "non_integer_id": 2,
        "negative_id": 2,
        "unknown_behavior": 1,
        "missing_timestamp": 1,
        "non_integer_timestamp": 1,
        "negative_timestamp": 1,
    }
    assert report.bad_row_examples == {
        "wrong_column_count": [f"{p}:3", f"{p}:10"],
        "non_integer_id": [f"{p}:5", f"{p}:12"],
        "negative_id": [f"{p}:14", f"{p}:16"],
        "unknown_behavior": [f"{p}:6"],
        "missing_timestamp": [f"{p}:7"],
        "non_integer_timestamp": [f"{p}:8"],
        "negative_timestamp": [f"{p}:15"],
    }
    assert report.rows_read == 14
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


# --- Trustworthy ingestion (issue 11): mappings, negatives, int64 edges, encodings, compression ---


def test_explicit_mapping_must_match_the_header(tmp_path: Path) -> None:
    """A --columns typo used to make auto read the file as headerless Taobao (exit 0, wrong data)."""
    path = write_lines(tmp_path / "hdr.csv", ["uid,iid,cid,beh,ts", f"1,10,100,pv,{T0}", f"2,11,100,pv,{T0}"])
    typo = ColumnMapping.parse("user=uidx,item=iid,category=cid,behavior=beh,timestamp=ts")
    for fmt in ("auto", "csv"):
        with pytest.raises(IngestError, match=r"hdr\.csv:1: header has no column 'uidx' \(columns: uid, iid"):
            read_event_log(path, fmt=fmt, columns=typo)
    with pytest.raises(ValueError, match="not to headerless taobao"):
        read_event_log(path, fmt="taobao", columns=typo)
    # A headerless file with an explicit mapping is not silently read as Taobao either.
    headerless = write_lines(tmp_path / "taobao.csv", [row(1, 10, T0)])
    with pytest.raises(IngestError, match=r"taobao\.csv:1: header has no column 'uidx'"):
        read_event_log(headerless, columns=typo)
    # Without --columns, a header naming some default columns but not all is an error too.
    partial = write_lines(tmp_path / "partial.csv", ["user_id,item_id,category_id,behavior,time", f"1,10,100,pv,{T0}"])
    with pytest.raises(IngestError, match=r"partial\.csv:1: header has no column 'timestamp'"):
        read_event_log(partial)
    right = ColumnMapping.parse("user=uid,item=iid,category=cid,behavior=beh,timestamp=ts")
    np.testing.assert_array_equal(read_event_log(path, columns=right)[0].user, [1, 2])


def test_negative_values_rejected_with_strict(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "neg.csv", [row(1, 10, T0), "-2,11,100,pv,1511570000", row(3, 12, -5)])
    with pytest.raises(IngestError, match=r"neg\.csv:2: field 'user_id': '-2' is negative$"):
        read_taobao_csv(path, strict=True)
    ts_only = write_lines(tmp_path / "ts.csv", [row(1, 10, T0), row(3, 12, -5)])
    with pytest.raises(IngestError, match=r"ts\.csv:2: field 'timestamp': '-5' is negative$"):
        read_taobao_csv(ts_only, strict=True)
    # Parquet: integer and timestamp columns are checked the same way.
    pq_path = tmp_path / "neg.parquet"
    pq.write_table(pa.table({"user_id": [1, -1, 2], "item_id": [1, 1, 1], "category_id": [1, 1, 1],
                             "behavior": ["pv"] * 3,
                             "timestamp": pa.array([T0, T0, -86_400], pa.timestamp("s"))}), pq_path)
    log, report = read_event_log(pq_path)
    assert (report.bad_rows["negative_id"], report.bad_rows["negative_timestamp"]) == (1, 1)
    np.testing.assert_array_equal(log.user, [1])


def test_19_digit_ids_are_judged_alone(tmp_path: Path) -> None:
    """A valid 19-digit id used to be counted non_integer_id when a bad row shared its block, and
    --strict then blamed it instead of the bad row."""
    big = 2**63 - 1
    lines = [row(big, 10, T0), "x,11,100,pv,1511570000", row(5, 12, T0), f"{big + 1},13,100,pv,{T0}",
             f"00000000000000000007,14,100,pv,{T0}", f" 0{big} ,15,100,pv,{T0}"]
    path = write_lines(tmp_path / "big.csv", lines)
    log, report = read_taobao_csv(path)
    assert sorted(log.user.tolist()) == [5, 7, big, big]
    assert report.bad_rows["non_integer_id"] == 2
    assert report.bad_row_examples["non_integer_id"] == [f"{path}:2", f"{path}:4"]
    with pytest.raises(IngestError, match=r"big\.csv:2: field 'user_id': 'x' is not an integer$"):
        read_taobao_csv(path, strict=True)
    # Alone (the fast all-valid path) the same rows give the same result.
    for i, line in enumerate(lines):
        alone = write_lines(tmp_path / f"alone{i}.csv", [line])
        assert len(read_taobao_csv(alone)[0]) == (i not in (1, 3)), line


def test_a_non_utf8_row_is_counted_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"\n".join([row(1, 10, T0).encode(), b"2,1\xff1,100,pv,1511570000", row(3, 12, T0).encode(),
                                 b"4,12,100,p\xe9,1511570000", b"", row(5, 13, T0).encode()]) + b"\r\n")
    log, report = read_taobao_csv(path)
    np.testing.assert_array_equal(log.user, [1, 3, 5])
    assert report.bad_rows["invalid_utf8"] == 2
    assert report.bad_row_examples["invalid_utf8"] == [f"{path}:2", f"{path}:4"]
    assert report.rows_read == 5 == accounted(report)
    with pytest.raises(IngestError, match=r"latin\.csv:2: not UTF-8 text \(byte 4 of the line\)$"):
        read_taobao_csv(path, strict=True)
    # With a header (quoted CSV) too; a valid non-ASCII field elsewhere is fine.
    generic = tmp_path / "generic.csv"
    generic.write_bytes(f"uid,iid,cid,beh,ts,note\n1,10,100,pv,{T0},caf\u00e9\n2,11,100,pv,{T0},\xff\n".encode("utf-8")
                        .replace("\u00ff".encode(), b"\xff"))
    mapping = ColumnMapping.parse("user=uid,item=iid,category=cid,behavior=beh,timestamp=ts")
    log, report = read_event_log(generic, columns=mapping)
    np.testing.assert_array_equal(log.user, [1])
    assert report.bad_row_examples == {"invalid_utf8": [f"{generic}:3"]}


def test_gzip_is_read_and_other_compression_refused(tmp_path: Path, small_events: EventLog) -> None:
    import bz2
    import gzip

    plain = tmp_path / "events.csv"
    write_taobao_csv(small_events, plain)
    packed = tmp_path / "events.csv.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    log, report = read_event_log(packed)
    assert_logs_equal(log, small_events)
    assert report.rows_kept == len(small_events)
    header = tmp_path / "generic.csv.gz"
    header.write_bytes(gzip.compress(f"user_id,item_id,category_id,behavior,timestamp\n1,2,3,pv,{T0}\n".encode()))
    assert read_event_log(header)[0].user.tolist() == [1]
    truncated = tmp_path / "cut.csv.gz"
    truncated.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(IngestError, match=r"cut\.csv\.gz: cannot read: ") as info:
        read_event_log(truncated)
    assert "\n" not in str(info.value)
    squeezed = tmp_path / "events.csv.bz2"
    squeezed.write_bytes(bz2.compress(plain.read_bytes()[:1000]))
    with pytest.raises(IngestError, match=r"events\.csv\.bz2: bzip2-compressed; decompress it first"):
        read_event_log(squeezed)


def test_binary_input_is_refused_in_one_clean_line(tmp_path: Path) -> None:
    binary = tmp_path / "model.csv"
    binary.write_bytes(b"1,2,3,pv,1511570000\n\x7fELF\x02\x01\x01\x00\x00\xff\xfe\n")
    for fmt in ("auto", "taobao"):
        with pytest.raises(IngestError) as info:
            read_event_log(binary, fmt=fmt)
        message = str(info.value)
        assert message == f"{binary}:2: binary data (a NUL byte), not a text event log"
    utf16 = tmp_path / "excel.csv"
    utf16.write_bytes(f"1,2,3,pv,{T0}\n".encode("utf-16"))
    with pytest.raises(IngestError, match=r"excel\.csv: UTF-16 text; convert it to UTF-8 first$"):
        read_event_log(utf16)
    # Parquet is recognised by its magic bytes whatever the file is called.
    disguised = tmp_path / "log.csv"
    pq.write_table(pa.table({"user_id": [4], "item_id": [5], "category_id": [6], "behavior": ["pv"],
                             "timestamp": [T0]}), disguised)
    assert read_event_log(disguised)[0].user.tolist() == [4]


def test_time_range_dates_in_a_time_zone(tmp_path: Path) -> None:
    utc = parse_time_range("2017-11-25:2017-12-04")
    shanghai = parse_time_range("2017-11-25:2017-12-04", "Asia/Shanghai")
    assert utc == (1511568000, 1512345600)
    assert shanghai == (utc[0] - 8 * 3600, utc[1] - 8 * 3600)
    assert parse_time_range("1511568000:1512345600", "Asia/Shanghai") == utc  # Unix seconds are absolute
    with pytest.raises(ValueError, match="time zone 'Mars/Olympus': not an IANA time zone"):
        parse_time_range("2017-11-25:2017-12-04", "Mars/Olympus")
    # Taobao's first day starts at 16:00 UTC the day before: in UTC those rows fall outside.
    path = write_lines(tmp_path / "tz.csv", [row(1, 10, utc[0] - 8 * 3600), row(1, 11, utc[0] - 1), row(1, 12, utc[1] - 1)])
    _, in_utc = read_taobao_csv(path, time_range=utc)
    log, in_shanghai = read_taobao_csv(path, time_range=shanghai)
    assert (in_utc.rows_kept, in_utc.out_of_range_dropped) == (1, 2)
    assert (in_shanghai.rows_kept, in_shanghai.out_of_range_dropped) == (2, 1)
    assert log.item.tolist() == [10, 11]


# --- Fuzzing: arbitrary input gives a result with every row accounted for, or one IngestError line ---

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ_EXAMPLES = 200
FUZZ_STATS = {"examples": 0, "results": 0, "ingest_errors": 0}
_FIELD_VALUES = ["1", "7", "-3", "0", "x", "", " 42 ", "007", "9223372036854775807", "9223372036854775808",
                 "-9223372036854775808", "00000000000000000001", "1e3", "2.0", "pv", "PV", " buy", "cart", "fav",
                 "click", "1511570000", "-1", '"5"', "caf\u00e9", "\u00b2"]
_FIELD = st.one_of(st.sampled_from(_FIELD_VALUES), st.text(st.characters(blacklist_characters="\r\n"), max_size=6))
_ROW = st.lists(_FIELD, min_size=0, max_size=7).map(",".join)


def _fuzz_file(draw_rows: list[str], newline: str, garbage: bytes, at: int) -> bytes:
    data = newline.join(draw_rows).encode("utf-8", "surrogatepass") + newline.encode()  # surrogates: not UTF-8
    at = min(at, len(data))
    return data[:at] + garbage + data[at:]


def _read_one(data: bytes, name: str, **kwargs):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        try:
            log, report = read_event_log(path, **kwargs)
        except IngestError as e:
            message = str(e)
            assert message and "\n" not in message and "\r" not in message, message
            assert message.isprintable() or "\\x" in message  # raw bytes are shown escaped, never printed
            return None, None
    assert accounted(report) == report.rows_read
    assert len(log) == report.rows_kept
    for f in FIELDS:
        assert getattr(log, f).dtype == (np.int8 if f == "behavior" else np.int64)
    assert (log.user >= 0).all() and (log.item >= 0).all() and (log.timestamp >= 0).all()
    return log, report


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    rows=st.lists(_ROW, max_size=8),
    header=st.booleans(),
    newline=st.sampled_from(["\n", "\r\n"]),
    garbage=st.one_of(st.just(b""), st.binary(max_size=12)),
    at=st.integers(0, 400),
    raw=st.one_of(st.none(), st.binary(max_size=200)),
    fmt=st.sampled_from(["auto", "taobao", "csv"]),
    strict=st.booleans(),
)
def test_fuzz_csv_reader(rows, header, newline, garbage, at, raw, fmt, strict) -> None:
    """Never another exception than IngestError; and, for Taobao input, every line is judged on its
    own: the rows kept from the whole file are the rows kept from each line read alone."""
    if header and fmt != "taobao":
        rows = [",".join(events._TAOBAO_COLUMNS)] + rows
    data = raw if raw is not None else _fuzz_file(rows, newline, garbage, at)
    name = "fuzz.csv"
    FUZZ_STATS["examples"] += 1
    log, _ = _read_one(data, name, fmt=fmt, strict=strict)
    FUZZ_STATS["results" if log is not None else "ingest_errors"] += 1
    if log is None or fmt != "taobao" or strict or raw is not None:
        return
    alone = set()
    for line in data.split(b"\n"):
        part, _ = _read_one(line + b"\n", name, fmt="taobao")
        if part is not None:
            alone |= set(zip(*(getattr(part, f).tolist() for f in FIELDS)))
    assert set(zip(*(getattr(log, f).tolist() for f in FIELDS))) == alone


def test_fuzz_ran_its_examples() -> None:
    """Reports how many inputs the fuzz test tried (run after it; -s shows the line)."""
    if FUZZ_STATS["examples"] == 0:
        pytest.skip("test_fuzz_csv_reader did not run in this session")
    print(f"\nCSV fuzz: {FUZZ_STATS}")
    assert FUZZ_STATS["examples"] >= FUZZ_EXAMPLES
