"""No drift between the bundle formats (sdk_builder/formats.py) and the three clients.

Every JSON key the Kotlin, Swift and C++ sources read or write (found by grepping their key-access
calls) must be a field of the Manifest model (by alias), of GoldenSet, of RefreshedState (the state a
client refreshes on the device) or a property of the generated events schema; every client must read
the keys of the contract, the refresh keys included; the clients must agree with each other on the
keys, the format version, the input order and the file names; and the Swift package, which cannot be
compiled here, must keep mirroring the Kotlin library (same types, same test names).
"""

from __future__ import annotations

import re
import typing

import pytest
from pydantic import BaseModel

from sdk_builder import formats
from tests.support import BROKEN_IDS, REPO, load_json

TEMPLATES = REPO / "mobile_templates"
KOTLIN_MAIN = TEMPLATES / "android" / "tbsm" / "src" / "main" / "kotlin"
KOTLIN_TEST = TEMPLATES / "android" / "tbsm" / "src" / "test" / "kotlin"
SWIFT_MAIN = TEMPLATES / "ios" / "Sources" / "TbsmSDK"
SWIFT_TEST = TEMPLATES / "ios" / "Tests" / "TbsmSDKTests"
CPP_MAIN = TEMPLATES / "native" / "src"

# How each client spells "read key K" / "write key K".
READ_PATTERNS = {
    "kotlin": r'\.get(?:JSONArray|JSONObject|Long|Int|String|Double|Boolean)\("([^"]+)"\)',
    "swift": r'\.(?:long|int|double|string|object|objects|longs|doubles|longMap|stringMap)\("([^"]+)"\)',
    "cpp": r'\.(?:at|find)\("([^"]+)"\)',
}
WRITE_PATTERNS = {
    "kotlin": r'\.put\("([^"]+)"',
    "swift": r'"([a-z][a-z0-9_]*)"\s*:\s*[A-Za-z]',
}
# The file of each client that writes the history (the events schema); the refreshed state is written elsewhere.
HISTORY_SOURCES = {"kotlin": KOTLIN_MAIN / "dev" / "tbsm" / "sdk" / "History.kt", "swift": SWIFT_MAIN / "History.swift"}
SOURCES = {"kotlin": (KOTLIN_MAIN, "*.kt"), "swift": (SWIFT_MAIN, "*.swift"), "cpp": (CPP_MAIN, "*.[ch]pp")}

# Keys every client has to read to follow the contract.
CORE_KEYS = {
    "format_version", "user_id", "files", "items", "categories", "ids", "first_row", "oov_row",
    "padding_row", "behaviors", "program", "inputs", "name", "method", "max_history", "max_candidates",
    "events", "item_id", "category_id", "behavior", "timestamp",
    "tolerance", "cases", "history", "request_time", "candidates", "scores", "user_state",
}
# Format version 2: the refresh program (manifest.refresh), its golden cases and the refreshed state file.
REFRESH_KEYS = {
    "refresh", "file", "window", "every_events", "steps", "learning_rate", "max_drift",
    "refresh_cases", "state_before", "state_after",
    "manifest_sha256", "through_timestamp", "through_count",
}


def source_text(lang: str) -> str:
    root, pattern = SOURCES[lang]
    files = sorted(root.rglob(pattern))
    assert files, f"no {lang} sources under {root}"
    return "\n".join(f.read_text() for f in files)


def keys(lang: str, patterns: dict[str, str], text: str | None = None) -> set[str]:
    return set(re.findall(patterns[lang], source_text(lang) if text is None else text))


def model_keys(model: type[BaseModel]) -> set[str]:
    """Field names (aliases where set) of a pydantic model and of the models nested in it."""
    out: set[str] = set()
    todo, seen = [model], set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for name, field in m.model_fields.items():
            out.add(field.alias or name)
            stack = [field.annotation]
            while stack:
                t = stack.pop()
                if isinstance(t, type) and issubclass(t, BaseModel):
                    todo.append(t)
                stack.extend(typing.get_args(t))
    return out


def schema_keys(schema: dict) -> set[str]:
    out: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                out.add(name)
                walk(sub)
            for k, v in node.items():
                if k != "properties":
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return out


MANIFEST_KEYS = model_keys(formats.Manifest)
GOLDEN_KEYS = model_keys(formats.GoldenSet)
SCHEMA_KEYS = schema_keys(formats.events_json_schema())
STATE_KEYS = model_keys(formats.RefreshedState)
PATCH_KEYS = model_keys(formats.BundlePatch)  # the header of a bundle patch (BundlePatch.kt / .swift)
KNOWN_KEYS = MANIFEST_KEYS | GOLDEN_KEYS | SCHEMA_KEYS | STATE_KEYS | PATCH_KEYS


@pytest.mark.parametrize("lang", ["kotlin", "swift", "cpp"])
def test_every_key_a_client_reads_is_defined_by_the_formats(lang):
    read = keys(lang, READ_PATTERNS)
    assert read, f"found no JSON reads in the {lang} sources: is the pattern out of date?"
    unknown = read - KNOWN_KEYS
    assert not unknown, (f"{lang} reads keys that neither Manifest, GoldenSet, RefreshedState, BundlePatch nor the "
                         f"events schema define: {unknown}")


@pytest.mark.parametrize("lang", ["kotlin", "swift", "cpp"])
def test_every_client_reads_the_core_keys(lang):
    missing = CORE_KEYS - keys(lang, READ_PATTERNS)
    assert not missing, f"{lang} does not read {missing}"


@pytest.mark.parametrize("lang", ["kotlin", "swift", "cpp"])
def test_every_client_reads_the_refresh_keys(lang):
    missing = REFRESH_KEYS - keys(lang, READ_PATTERNS)
    assert not missing, f"{lang} does not read {missing}"


def test_core_and_refresh_keys_are_defined_by_the_formats():
    assert CORE_KEYS | REFRESH_KEYS <= KNOWN_KEYS, (CORE_KEYS | REFRESH_KEYS) - KNOWN_KEYS
    assert {"refresh", "user_state"} <= MANIFEST_KEYS
    assert {"refresh_cases", "state_before", "state_after"} <= GOLDEN_KEYS


@pytest.mark.parametrize("lang", ["kotlin", "swift"])
def test_history_files_are_written_in_the_events_schema(lang):
    written = keys(lang, WRITE_PATTERNS, HISTORY_SOURCES[lang].read_text())
    schema = formats.events_json_schema()
    event_schema = schema["$defs"]["Event"]
    required = set(schema.get("required", [])) | set(event_schema.get("required", []))
    assert written == set(schema["properties"]) | set(event_schema["properties"]), written
    assert required <= written


@pytest.mark.parametrize("lang", ["kotlin", "swift"])
def test_refreshed_state_files_are_written_as_the_format_defines_them(lang):
    """Every other key the templates write is the refreshed state's (formats.RefreshedState), all of it."""
    others = "\n".join(f.read_text() for f in sorted(SOURCES[lang][0].rglob(SOURCES[lang][1])) if f != HISTORY_SOURCES[lang])
    assert keys(lang, WRITE_PATTERNS, others) == STATE_KEYS


def _quoted_list(text: str, start: str) -> list[str]:
    i = text.index(start)
    body = text[i : text.index(")" if "listOf" in start else ("]" if "[" in start else "}"), i + len(start))]
    return re.findall(r'"([^"]+)"', body)


def test_clients_agree_on_input_names_and_the_bundle_lists_them_in_that_order(client_bundles):
    kotlin = _quoted_list(source_text("kotlin"), "INPUT_NAMES = listOf(")
    swift = _quoted_list(source_text("swift"), "inputNames = [")
    cpp = _quoted_list(source_text("cpp"), "names = {")
    assert kotlin == swift == cpp, (kotlin, swift, cpp)
    for bundle in client_bundles:
        manifest = load_json(bundle / "manifest.json")
        assert [spec["name"] for spec in manifest["program"]["inputs"]] == kotlin, bundle


def test_clients_agree_on_the_format_version():
    version = formats.BUNDLE_FORMAT_VERSION
    assert re.search(rf"const val FORMAT_VERSION = {version}\b", source_text("kotlin"))
    assert re.search(rf"static let supportedFormatVersion = {version}\b", source_text("swift"))
    assert re.search(rf"constexpr int64_t kFormatVersion = {version};", source_text("cpp"))
    assert version == 3, "a new format version: update the templates, docs/bundle-format.md and this test together"


@pytest.mark.parametrize("lang", ["kotlin", "swift", "cpp"])
def test_file_names_the_clients_open_exist_in_bundles(lang, client_bundles):
    # History and refreshed-state files are the app's, not the bundle's.
    names = set(re.findall(r'"/?([\w.-]+\.(?:json|pte))"', source_text(lang))) - {"history.json", "tbsm-history.json", ".state.json"}
    assert {"manifest.json", "model.pte"} <= names, names
    for bundle in client_bundles:
        present = {p.name for p in bundle.iterdir()}
        assert names <= present, (lang, names - present)


def _declared_types(text: str, kinds: str) -> set[str]:
    return set(re.findall(rf"^\s*(?:public |internal |private )?(?:final |data |abstract )?(?:{kinds}) (\w+)", text, re.M))


def test_swift_declares_the_same_types_as_kotlin():
    kotlin = _declared_types(source_text("kotlin"), "class|interface|object")
    swift = _declared_types(source_text("swift"), "class|struct|enum|protocol")
    # Kotlin's exception and Android glue have Swift counterparts under other names.
    kotlin -= {"BundleException"}
    swift -= {"TbsmError", "JSONObject"}
    assert {"RefreshSpec", "RefreshLoop", "RefreshedState", "ExecuTorchRefresh", "GoldenRefreshCase"} <= kotlin
    assert kotlin == swift, kotlin ^ swift


def test_swift_tests_mirror_the_kotlin_tests():
    kotlin_tests = set()
    for path in KOTLIN_TEST.rglob("*Test.kt"):
        kotlin_tests |= set(re.findall(r"@Test(?:\([^)]*\))?\s+fun (\w+)\(", path.read_text()))
    swift_tests = set()
    for path in SWIFT_TEST.rglob("*Tests.swift"):
        swift_tests |= {name[4].lower() + name[5:] for name in re.findall(r"func (test\w+)\(", path.read_text())}
    missing = kotlin_tests - swift_tests
    assert not missing, f"Kotlin tests without a Swift twin: {missing}"


def test_swift_and_kotlin_read_the_same_keys():
    assert keys("kotlin", READ_PATTERNS) == keys("swift", READ_PATTERNS)


def test_init_mobile_scaffolds_projects_with_a_verified_bundle(built_bundle, tmp_path):
    """`tbsm-sdk init-mobile` copies the template and drops the bundle where the template reads it."""
    import subprocess
    import sys

    cli = [sys.executable, "-m", "sdk_builder.cli", "init-mobile"]
    android = subprocess.run([*cli, "android", str(tmp_path / "app"), "--bundle", str(built_bundle)], capture_output=True, text=True)
    assert android.returncode == 0, android.stderr
    assets = tmp_path / "app" / "sample" / "src" / "main" / "assets" / "tbsm"
    assert (assets / "model.pte").read_bytes() == (built_bundle / "model.pte").read_bytes()
    assert (tmp_path / "app" / "tbsm" / "build.gradle.kts").is_file()
    ios = subprocess.run([*cli, "ios", str(tmp_path / "kit")], capture_output=True, text=True)
    assert ios.returncode == 0 and (tmp_path / "kit" / "Package.swift").is_file()
    again = subprocess.run([*cli, "ios", str(tmp_path / "kit")], capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr.strip().splitlines()[-1]


# The ids the Kotlin and Swift unit tests decode: differences of 1, 2 and 3 units (2**23 - 1 the largest
# of one unit, 2**23 the smallest of two), up to the largest int64.
ID_VECTOR = ([5, 6, 300, 300 + 2**23 - 1, 300 + 2**24 - 1, 2**46 + 7, 2**62, 2**63 - 1],
             "AAAFAAABAAEmf///gAAAAAAB//7cf//9///5////AP/+////////AP//")


def test_clients_test_the_id_encoding_the_builder_writes():
    """manifest items.ids / categories.ids (format_version 3): the template tests decode what
    formats.encode_ids writes and refuse what formats.decode_ids refuses, for the same reasons."""
    ids, text = ID_VECTOR
    assert formats.encode_ids(ids) == text and formats.decode_ids(text) == ids
    tests = {lang: "\n".join(p.read_text() for p in root.rglob(pattern))
             for lang, (root, pattern) in {"kotlin": (KOTLIN_TEST, "IdShardTest.kt"), "swift": (SWIFT_TEST, "IdShardTests.swift")}.items()}
    for lang, source in tests.items():
        assert f'"{text}"' in source, f"the {lang} IdShard tests do not decode {text}"
        for broken, reason in BROKEN_IDS.items():
            assert re.search(rf'"{re.escape(broken)}"(?: to|,) "{reason}"', source), f"the {lang} IdShard tests do not refuse {broken}"
    for broken, reason in BROKEN_IDS.items():
        with pytest.raises(ValueError, match=reason):
            formats.decode_ids(broken)


def test_the_worked_id_example_of_the_docs_is_what_the_builder_writes():
    doc = (REPO / "docs" / "bundle-format.md").read_text()
    example = re.search(r"Example: ids `\[([0-9, ]+)\]`.*?-> `\"([A-Za-z0-9+/]*)\"`", doc, re.S)
    assert example, "docs/bundle-format.md has no worked example of the id encoding"
    assert formats.encode_ids([int(i) for i in example[1].split(",")]) == example[2]


def test_clients_agree_on_the_patch_format():
    """BundlePatch.kt and BundlePatch.swift read the patches sdk_builder/bundle/delta.py writes."""
    kotlin, swift = source_text("kotlin"), source_text("swift")
    assert re.search(rf"const val PATCH_FORMAT_VERSION = {formats.PATCH_FORMAT_VERSION}\b", kotlin)
    assert re.search(rf"static let patchFormatVersion = {formats.PATCH_FORMAT_VERSION}\b", swift)
    assert re.search(rf"const val COPY = {formats.PATCH_COPY}\b", kotlin) and re.search(rf"const val INSERT = {formats.PATCH_INSERT}\b", kotlin)
    assert re.search(rf"let copy: UInt8 = {formats.PATCH_COPY}\b", swift) and re.search(rf"let insert: UInt8 = {formats.PATCH_INSERT}\b", swift)
    assert "Inflater(true)" in kotlin and "COMPRESSION_ZLIB" in swift  # raw DEFLATE, as delta.py writes (wbits -15)
