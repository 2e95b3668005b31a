"""`tbsm-sdk verify`: hashes, manifest, schema and golden vectors replayed in the ExecuTorch runtime."""

from __future__ import annotations

import json
from pathlib import Path

from jsonschema import Draft202012Validator

from sdk_builder.bundle.golden import replay_golden
from sdk_builder.client import Bundle
from sdk_builder.formats import GOLDEN, MANIFEST, PROGRAM, SCHEMA, BundleError


def verify_bundle(path: Path) -> dict:
    """Hashes, manifest, schema and golden vectors replayed in the ExecuTorch runtime."""
    bundle = Bundle(Path(path))
    m = bundle.manifest
    expected = {PROGRAM, SCHEMA, GOLDEN}
    missing = expected - set(m.files)
    if missing:
        raise BundleError(f"{bundle.path / MANIFEST}: files: {sorted(missing)} not listed")
    if m.items.ids != sorted(set(m.items.ids)) or m.categories.ids != sorted(set(m.categories.ids)):
        raise BundleError(f"{bundle.path / MANIFEST}: items.ids / categories.ids must be sorted and unique")
    try:
        schema = json.loads((bundle.path / SCHEMA).read_text())
        Draft202012Validator.check_schema(schema)
    except Exception as exc:
        raise BundleError(f"{bundle.path / SCHEMA}: not a valid JSON Schema ({type(exc).__name__})") from None
    validator = Draft202012Validator(schema)
    golden = bundle.golden()
    if golden.tolerance != m.golden_tolerance:
        raise BundleError(f"{bundle.path / GOLDEN}: tolerance {golden.tolerance:g} differs from the manifest's {m.golden_tolerance:g}")
    for case in golden.cases:
        errors = list(validator.iter_errors(case.history.model_dump(mode="json")))
        if errors:
            raise BundleError(f"{bundle.path / GOLDEN}: case {case.name}: history fails the schema: {errors[0].message}")
    worst = replay_golden(m, golden, bundle.method)
    if worst > golden.tolerance:
        raise BundleError(f"{bundle.path}: golden vectors differ by {worst:.2e} > tolerance {golden.tolerance:g}")
    return {"bundle": str(bundle.path), "user_id": m.user_id, "ok": True, "cases": len(golden.cases),
            "max_abs_diff": worst, "items": len(m.items.ids), "categories": len(m.categories.ids),
            "bytes": {name: (bundle.path / name).stat().st_size for name in sorted(expected | {MANIFEST})}}
