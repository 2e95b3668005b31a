"""The Android template's Kotlin, compiled and unit-tested on a plain JVM (no Android SDK, no Gradle).

- kotlinc comes from the npm package `kotlin-compiler` (the version the Gradle build pins), installed
  into build/kotlinc/<version>/; JUnit 4, Hamcrest and Android's org.json come from Debian packages
  (junit4, libandroid-json-java), installed with apt-get when missing and possible.
- Every Kotlin source of the template (library, sample app, unit and device tests) is compiled in one
  go against compile-only stubs of the Android and ExecuTorch APIs (mobile_templates/android/compile-stubs).
- The JUnit tests run against each test bundle, and GoldenInputsDumpKt prints the input tensors the
  Kotlin logic builds for every golden case (plus harder extra cases); they must equal the Python
  reference mapping exactly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_native_client import (  # noqa: E402
    BUILD, REPO, _tree_hash, bundle_dirs, load_json, prune_stale, reference_inputs,
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
    prefix = BUILD / "kotlinc" / version
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
    jars = _find_jars()
    if jars is not None:
        return jars
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        pytest.skip("junit4 / libandroid-json-java are missing and apt-get is not usable")
    packages = sorted({pkg for pkg, _ in JARS.values()})
    install = [apt, "install", "-y", "--no-install-recommends", *packages]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run = dict(capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    if subprocess.run(install, **run).returncode != 0:
        subprocess.run([apt, "update"], **run)
        proc = subprocess.run(install, **run)
        assert proc.returncode == 0, f"apt-get install {' '.join(packages)} failed:\n{proc.stderr[-3000:]}"
    jars = _find_jars()
    assert jars is not None, "Debian packages installed but their jars were not found"
    return jars


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    """Compiles every template source once per source state; the class path to run the result."""
    exe, stdlib = kotlinc()
    jars = debian_jars()
    lib_cp = os.pathsep.join(str(j) for j in jars.values())
    key = _tree_hash(SOURCE_DIRS, f"{exe} {lib_cp}")
    out = BUILD / "kotlin-template" / key
    if not (out / "DONE").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cmd = [str(exe), "-jvm-target", "17", "-cp", lib_cp, "-d", str(out / "classes"), *map(str, SOURCE_DIRS)]
        env = dict(os.environ, JAVA_OPTS="-Xmx2g")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, f"kotlinc failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        (out / "kotlinc.log").write_text(proc.stderr)
        (out / "DONE").write_text("ok\n")
        prune_stale(out.parent, out)
    return {
        "classpath": os.pathsep.join([str(out / "classes"), str(stdlib), lib_cp]),
        "log": (out / "kotlinc.log").read_text(),
    }


@pytest.fixture(scope="module")
def classpath(compiled) -> str:
    return compiled["classpath"]


@pytest.fixture(scope="module")
def bundles() -> list[Path]:
    return bundle_dirs()


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
        print(f"kotlin junit on {bundle.relative_to(BUILD)}: {m.group(0)}")


def extra_cases(manifest: dict, golden: dict) -> dict:
    """Harder requests than the golden ones: a history longer than max_history, ids outside the shard,
    ids next to shard boundaries, every behaviour."""
    items, cats = manifest["items"]["ids"], manifest["categories"]["ids"]
    behaviors = sorted(manifest["behaviors"])
    user = manifest["user_id"]
    t = manifest["program"]["max_history"]
    base = 1_600_000_000
    long_events = [
        {
            "item_id": items[(7 * k) % len(items)] if k % 3 else items[-1] + 1 + k,
            "category_id": cats[(5 * k) % len(cats)] if k % 4 else 2**40 + k,
            "behavior": behaviors[k % len(behaviors)],
            "timestamp": base + 60 * (k // 2),
        }
        for k in range(t + 11)
    ]
    edge_ids = [items[0], items[-1], max(items[0] - 1, 0), items[-1] + 1, 0, 2**40, items[len(items) // 2]]
    edge_ids += [i + 1 for i in items[:5]] + items[-5:]
    cases = [
        {"name": "longer_than_max_history", "history": {"user_id": user, "events": long_events},
         "request_time": base + 10_000, "candidates": edge_ids},
        {"name": "exactly_max_history", "history": {"user_id": user, "events": long_events[-t:]},
         "request_time": base + 10_000, "candidates": items[:3]},
        {"name": "single_candidate_oov", "history": {"user_id": user, "events": long_events[:2]},
         "request_time": base, "candidates": [items[-1] + 12345]},
        {"name": "no_events_key", "history": {"user_id": user}, "request_time": base, "candidates": items[-2:]},
    ]
    for case in cases:
        case["scores"] = [0.0] * len(case["candidates"])
    return {"tolerance": golden["tolerance"], "cases": cases}


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
        cases = golden["cases"] + extra["cases"]
        assert [line["case"] for line in lines] == [c["name"] for c in cases]
        for line, case in zip(lines, cases):
            expected = reference_inputs(manifest, case["history"], case["request_time"], case["candidates"])
            for name, values in expected.items():
                assert line[name] == values, (bundle.name, case["name"], name)
            checked += 1
    print(f"kotlin inputs identical to the Python reference for {checked} cases")
