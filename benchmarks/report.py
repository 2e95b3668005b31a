"""Append a benchmark table to docs/benchmarks.md under its own section, with the run context."""

from __future__ import annotations

import sys

from benchmarks._common import append_to_doc, context_line


def append_report(title: str, context: str, table: str) -> None:
    append_to_doc(f"## {title}", f"{context_line(' '.join(['python', *sys.argv]))}; {context}\n\n{table.rstrip()}")
