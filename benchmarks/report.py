"""Append a benchmark table to docs/benchmarks.md with the context needed to compare runs."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=DOC.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "none"


def append_report(title: str, context: str, table: str) -> None:
    DOC.parent.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = f"\n## {title}\n\n{stamp}, commit {git_commit()}, {os.cpu_count()} CPUs ({platform.machine()}); {context}\n\n"
    with open(DOC, "a") as f:
        f.write(header + table.rstrip() + "\n")
