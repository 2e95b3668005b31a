"""The Android template's Kotlin, compiled and unit-tested on a plain JVM (no Android SDK, no Gradle).

- kotlinc comes from the npm package `kotlin-compiler` (the version the Gradle build pins), installed
  into a tool cache in the system's temporary directory (tests.support.TOOL_CACHE); JUnit 4, Hamcrest
  and Android's org.json come from Debian packages (junit4, libandroid-json-java), installed with
  apt-get when missing.
- Every Kotlin source of the template (library, sample app, unit and device tests) is compiled in one
  go against compile-only stubs of the Android and ExecuTorch APIs (mobile_templates/android/compile-stubs).
- The JUnit tests run against each test bundle (`client_bundles`: xnnpack, portable, int8), and GoldenInputsDumpKt prints the input tensors the
  Kotlin logic builds for every golden case (plus harder extra cases) and, on a bundle with a refresh
  program, the refresh program's event tensors of every golden refresh case; they must equal the
  Python reference mapping exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import (
    REPO, TOOL_CACHE, ensure_debian_packages, extra_cases, load_json, reference_inputs, reference_refresh_events,
)

ANDROID = REPO / "mobile_templates" / "android"
SOURCE_DIRS = [
    ANDROID / "tbsm" / "src" / "main" / "kotlin",
    ANDROID / "tbsm" / "src" / "test" / "kotlin",
    ANDROID / "sample" / "src" / "main" / "kotlin",
    ANDROID / "sample" / "src" / "androidTest" / "kotlin",
    ANDROID / "compile-stubs",
]
JARS = {
    "junit": ("junit4", ["/usr/share/java/junit4.jar"]),
    "hamcrest": ("libhamcrest-java", ["/usr/share/java/hamcrest.jar", "/usr/share/java/hamcrest-core.jar"]),
    "json": ("libandroid-json-java", ["/usr/share/java/com.android.json.jar"]),
}


def kotlin_version() -> str:
    text = (ANDROID / "build.gradle.kts").read_text()
    m = re.search(r'id\("org\.jetbrains\.kotlin\.android"\) version "([^"]+)"', text)
    assert m, "build.gradle.kts pins no Kotlin plugin version"
    return m.group(1)


def kotlinc() -> tuple[Path, Path]:
    """(kotlinc, kotlin-stdlib.jar), installing kotlin-compiler from npm on first use."""
    if shutil.which("java") is None:
        pytest.skip("no java on PATH")
    version = kotlin_version()
    prefix = TOOL_CACHE / "kotlinc" / version
    home = prefix / "node_modules" / "kotlin-compiler"
    exe = home / "bin" / "kotlinc"
    if not exe.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is unavailable: cannot install the Kotlin compiler")
        prefix.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"kotlin-compiler@{version}"],
            capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
        )
        assert proc.returncode == 0 and exe.exists(), f"npm install kotlin-compiler@{version} failed:\n{proc.stderr[-3000:]}"
    for script in (home / "bin").iterdir():  # npm may drop the execute bits of the shell launchers
        if not script.suffix:
            script.chmod(script.stat().st_mode | 0o111)
    return exe, home / "lib" / "kotlin-stdlib.jar"


def _find_jars() -> dict[str, Path] | None:
    found = {}
    for key, (_, candidates) in JARS.items():
        hit = next((Path(c) for c in candidates if Path(c).exists()), None)
        if hit is None:
            return None
        found[key] = hit
    return found


def debian_jars() -> dict[str, Path]:
    """JUnit 4, Hamcrest and org.json jars from Debian, installed with apt-get when missing."""
    packages = {pkg: (lambda cands=cands: any(Path(c).exists() for c in cands)) for pkg, cands in JARS.values()}
    ensure_debian_packages(packages)
    jars = _find_jars()
    assert jars is not None, "Debian packages installed but their jars were not found"
    return jars


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    """Compiles every template source once, into a temporary directory; the class path to run the result."""
    exe, stdlib = kotlinc()
    jars = debian_jars()
    lib_cp = os.pathsep.join(str(j) for j in jars.values())
    out = tmp_path_factory.mktemp("kotlin-template")
    cmd = [str(exe), "-jvm-target", "17", "-cp", lib_cp, "-d", str(out / "classes"), *map(str, SOURCE_DIRS)]
    env = dict(os.environ, JAVA_OPTS="-Xmx2g")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, f"kotlinc failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    return {"classpath": os.pathsep.join([str(out / "classes"), str(stdlib), lib_cp]), "log": proc.stderr}


@pytest.fixture(scope="module")
def classpath(compiled) -> str:
    return compiled["classpath"]


@pytest.fixture(scope="module")
def bundles(client_bundles, refresh_client_bundle) -> list[Path]:
    return [*client_bundles, refresh_client_bundle]


def junit_classes() -> list[str]:
    test_dir = ANDROID / "tbsm" / "src" / "test" / "kotlin"
    names = []
    for path in sorted(test_dir.rglob("*Test.kt")):
        package = re.search(r"^package\s+([\w.]+)", path.read_text(), re.M).group(1)
        names.append(f"{package}.{path.stem}")
    return names


def test_every_template_source_compiles(compiled):
    """Library, sample app, JVM and device tests, against the API stubs; warnings are shown, not fatal."""
    assert "error:" not in compiled["log"], compiled["log"]
    warnings = [line for line in compiled["log"].splitlines() if "warning:" in line]
    print(f"kotlinc: {len(warnings)} warnings", *warnings, sep="\n")


def test_junit_unit_tests_pass_on_each_bundle(classpath, bundles):
    classes = junit_classes()
    assert len(classes) >= 4, classes
    for bundle in bundles:
        proc = subprocess.run(
            ["java", f"-Dtbsm.bundle={bundle}", "-cp", classpath, "org.junit.runner.JUnitCore", *classes],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, f"{bundle.name}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        m = re.search(r"^OK \((\d+) tests?\)", proc.stdout, re.M)
        assert m and int(m.group(1)) >= 15, proc.stdout
        print(f"kotlin junit on {bundle}: {m.group(0)}")


def test_kotlin_inputs_equal_the_python_reference(classpath, bundles, tmp_path):
    checked = 0
    for bundle in bundles:
        manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
        extra = extra_cases(manifest, golden)
        extra_file = tmp_path / f"{bundle.name}-extra.json"
        extra_file.write_text(json.dumps(extra))
        proc = subprocess.run(
            ["java", "-cp", classpath, "dev.tbsm.sdk.GoldenInputsDumpKt", str(bundle), str(extra_file)],
            capture_output=True, text=True, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        lines = [line for line in lines if "case" in line]  # refresh cases: test_kotlin_refresh_inputs_...
        cases = golden["cases"] + extra["cases"]
        assert [line["case"] for line in lines] == [c["name"] for c in cases]
        for line, case in zip(lines, cases):
            expected = reference_inputs(manifest, case["history"], case["request_time"], case["candidates"])
            for name, values in expected.items():
                assert line[name] == values, (bundle.name, case["name"], name)
            checked += 1
    print(f"kotlin inputs identical to the Python reference for {checked} cases")


def test_kotlin_reads_a_cold_start_bundle(classpath, builder, tmp_path):
    """manifest.user_id and the golden histories' user_id are null (kind cold_start): parsed, and encoded
    exactly like the Python reference."""
    from sdk_builder.bundle.coldstart import build_cold_start

    bundle = build_cold_start(builder, tmp_path / "out").path
    manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
    extra_file = tmp_path / "extra.json"
    extra_file.write_text(json.dumps(extra_cases(manifest, golden)))
    proc = subprocess.run(["java", "-cp", classpath, "dev.tbsm.sdk.GoldenInputsDumpKt", str(bundle), str(extra_file)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    cases = golden["cases"] + json.loads(extra_file.read_text())["cases"]
    assert [line["case"] for line in lines] == [c["name"] for c in cases]
    for line, case in zip(lines, cases):
        expected = reference_inputs(manifest, case["history"], case["request_time"], case["candidates"])
        assert all(line[name] == values for name, values in expected.items()), case["name"]


def test_kotlin_refresh_inputs_equal_the_python_reference(classpath, refresh_client_bundle):
    bundle = refresh_client_bundle
    manifest, golden = load_json(bundle / "manifest.json"), load_json(bundle / "golden.json")
    proc = subprocess.run(["java", "-cp", classpath, "dev.tbsm.sdk.GoldenInputsDumpKt", str(bundle)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ranking = [line for line in lines if "case" in line]
    refresh = [line for line in lines if "refresh_case" in line]
    assert [line["case"] for line in ranking] == [c["name"] for c in golden["cases"]]
    shipped_state = reference_inputs(manifest, golden["cases"][0]["history"], 0, [])["user_state"]
    for line, case in zip(ranking, golden["cases"]):  # the 7th input is the shipped state
        assert line["user_state"] == shipped_state, case["name"]
    assert golden["refresh_cases"] and [line["refresh_case"] for line in refresh] == [c["name"] for c in golden["refresh_cases"]]
    for line, case in zip(refresh, golden["refresh_cases"]):
        expected = reference_refresh_events(manifest, {"user_id": manifest["user_id"], "events": case["events"]})
        assert len(expected["events_items"]) == manifest["refresh"]["events"]
        for name, values in expected.items():
            assert line[name] == values, (case["name"], name)
    print(f"kotlin refresh inputs identical to the Python reference for {len(refresh)} refresh cases")


def test_kotlin_applies_a_python_patch_atomically(classpath, bundles, tmp_path):
    """BundlePatch.kt: old + a patch from sdk_builder.bundle.delta = the new bundle, byte for byte; a
    damaged patch or one made for another bundle fails in one line and leaves the old bundle as it was."""
    from sdk_builder.bundle.delta import make_patch

    old, new = bundles[0], bundles[1]  # two users: other shards, so ids and table rows shift

    def tree(path: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(path.iterdir())}

    def apply(patch: bytes) -> tuple[subprocess.CompletedProcess, Path]:
        copy = tmp_path / "bundle"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(old, copy)
        (tmp_path / "p.patch").write_bytes(patch)
        proc = subprocess.run(["java", "-cp", classpath, "dev.tbsm.sdk.BundlePatchApply", str(copy), str(tmp_path / "p.patch")],
                              capture_output=True, text=True, timeout=120)
        return proc, copy

    proc, copy = apply(make_patch(old, new))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree(copy) == tree(new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "p.patch"]  # staging and old copy removed
    damaged = bytearray(make_patch(old, new))
    damaged[-20] ^= 0xFF
    for patch in (bytes(damaged), make_patch(new, old)):
        proc, copy = apply(patch)
        assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
        assert tree(copy) == tree(old)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "p.patch"]
