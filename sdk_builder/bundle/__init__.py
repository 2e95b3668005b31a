"""Bundles: build (orchestration), golden vectors, accuracy budget, storage, verify, inspect, many users.

The public names, importable from here: `BundleBuilder`, `BuildResult`, `bundle_path`,
`write_bundle_atomically`, `parse_user_id`, `verify_bundle`, `replay_golden`.
"""

from sdk_builder.bundle.build import BuildResult, BundleBuilder
from sdk_builder.bundle.golden import replay_golden
from sdk_builder.bundle.store import bundle_path, parse_user_id, write_bundle_atomically
from sdk_builder.bundle.verify import verify_bundle

__all__ = ["BuildResult", "BundleBuilder", "bundle_path", "parse_user_id", "replay_golden", "verify_bundle",
           "write_bundle_atomically"]
