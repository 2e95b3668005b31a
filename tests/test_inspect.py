"""`inspect`'s split of a program's non-tensor bytes (what used to be one 16 KB "structure" line)."""

from __future__ import annotations

from pathlib import Path

from sdk_builder.bundle.inspect import inspect_program


def test_program_overhead_is_split_into_what_it_encodes(built_bundle):
    data = (Path(built_bundle) / "model.pte").read_bytes()
    parts = inspect_program(data)
    assert sum(p["bytes"] for p in parts) == len(data)
    overhead = {p["name"].split(" (")[0]: p for p in parts if p["kind"] == "overhead"}
    values, instructions = overhead["program values"], overhead["instructions"]
    # Every value and instruction costs flatbuffer bytes (a union tag, offsets, a table): a split
    # that lost them to the rest line, or counted them twice (a negative rest), fails here.
    assert values["bytes"] >= 16 * values["values"] and instructions["bytes"] >= 16 * instructions["instructions"]
    rest = overhead["flatbuffer structure, headers, input specs, segment tables"]
    assert 0 <= rest["bytes"] < values["bytes"]
    assert rest["program_flatbuffer_bytes"] <= len(data)
