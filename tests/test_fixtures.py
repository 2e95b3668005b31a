"""The checked-in fixtures (fixtures/): what the script beside them writes, and usable as documented."""

from __future__ import annotations

import subprocess
import sys

from sdk_builder.client import parse_history
from sdk_builder.data.events import read_taobao_csv
from tests.support import REPO

FIXTURES = REPO / "fixtures"
SCRIPT = FIXTURES / "make_fixtures.py"
FILES = ("UserBehavior-tiny.csv", "history.json", "candidates.txt")


def test_the_script_writes_exactly_the_checked_in_fixtures(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (FIXTURES / name).read_bytes(), f"rerun {SCRIPT.relative_to(REPO)}: {name} drifted"


def test_the_tiny_log_has_one_bad_row_of_each_kind():
    log, report = read_taobao_csv(FIXTURES / "UserBehavior-tiny.csv")
    assert report.bad_rows == dict.fromkeys(report.bad_rows, 1)  # every reason ingestion counts, once
    assert len(log) == report.rows_kept and len(set(log.user.tolist())) == 40


def test_history_and_candidates_are_for_the_logs_first_user():
    log, _ = read_taobao_csv(FIXTURES / "UserBehavior-tiny.csv")
    history = parse_history((FIXTURES / "history.json").read_text(), "fixtures/history.json")
    assert history.user_id == int(log.user.min()) and len(history.events) == 20
    candidates = [int(line) for line in (FIXTURES / "candidates.txt").read_text().split()]
    known = set(log.item.tolist())
    assert len(candidates) == len(set(candidates)) and sum(c not in known for c in candidates) == 1
