"""Bundles: build (orchestration), golden vectors, accuracy budget, storage, verify, inspect, many users.

The public names, importable from here: `BundleBuilder`, `BuildResult`, `bundle_path`,
`write_bundle_atomically`, `parse_user_id`, `verify_bundle`, `replay_golden`. They are imported on
first use: `rank`, `verify` and `inspect` import submodules of this package, and importing the
builder here would load the exporter and the training data stack for them too (seconds of start-up).
"""

from __future__ import annotations

import importlib

_HOME = {"BuildResult": "build", "BundleBuilder": "build", "replay_golden": "golden", "bundle_path": "store",
         "parse_user_id": "store", "write_bundle_atomically": "store", "verify_bundle": "verify"}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
