"""The layers of docs/architecture.md, checked: every import points down, and there is no import circle.

Imports are read from the source (`ast`), lazy ones inside functions included. Run as a script
(`python tests/test_layering.py [REPO]`) it prints the import circles of a checkout.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "sdk_builder")

# Lower may not import higher; equal ranks may import each other (no circle: see the last test).
LAYERS: dict[str, int] = {
    "model.metrics": 0, "model.tbsm": 0, "model.train": 1, "model": 0,
    "sdk_builder": 0, "sdk_builder.util": 0, "sdk_builder.formats": 0,
    "sdk_builder.runtime": 1,
    "sdk_builder.client": 2,
    "sdk_builder.data": 2, "sdk_builder.data.events": 2, "sdk_builder.data.synthetic": 3, "sdk_builder.data.dataset": 3,
    "sdk_builder.shard": 4,
    # runs validates by ranking each validation user's shard, so the ranking evaluation sits below it
    "sdk_builder.evaluation": 5, "sdk_builder.runs": 5,
    "sdk_builder.program": 6,
    "sdk_builder.recipes": 7, "sdk_builder.recipes.base": 7, "sdk_builder.recipes.fp32": 7, "sdk_builder.recipes.int8": 7, "sdk_builder.recipes.fp16": 7, "sdk_builder.recipes.fp16_weights": 7,
    "sdk_builder.stamp": 8,
    "sdk_builder.bundle.select": 9, "sdk_builder.bundle.store": 9, "sdk_builder.bundle.golden": 9,
    "sdk_builder.refresh": 9,
    "sdk_builder.bundle.delta": 9,
    "sdk_builder.bundle.budget": 10, "sdk_builder.bundle.verify": 10, "sdk_builder.bundle.inspect": 10,
    "sdk_builder.bundle.build": 11,
    "sdk_builder.bundle.many": 12, "sdk_builder.bundle.coldstart": 12, "sdk_builder.bundle": 12,
    "sdk_builder.demo": 13,
    "sdk_builder.ondevice": 13,
    "sdk_builder.cli": 14,
}
# The phone side: what a phone does must not pull in the exporter, the model or the builder.
PHONE_SIDE = {"sdk_builder.client": {"sdk_builder.formats", "sdk_builder.runtime", "sdk_builder.util"},
              "sdk_builder.runtime": set(), "sdk_builder.formats": set(), "sdk_builder.util": set()}


def module_files(repo: Path) -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((repo / package).rglob("*.py")):
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def import_graph(repo: Path = REPO) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in its source)."""
    files = module_files(repo)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
            else:
                continue
            for candidate in candidates:
                # The longest project module that the import names (a submodule, else its package).
                while candidate and candidate not in files:
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    missing = sorted(set(module_files(REPO)) - set(LAYERS))
    assert not missing, f"add these modules to LAYERS and to docs/architecture.md: {missing}"


def test_imports_point_down():
    graph = import_graph()
    wrong = [f"{a} (layer {LAYERS[a]}) imports {b} (layer {LAYERS[b]})"
             for a, targets in graph.items() for b in sorted(targets) if LAYERS[b] > LAYERS[a]]
    assert not wrong, "\n".join(wrong)


def test_model_does_not_import_the_sdk_and_nothing_imports_the_cli():
    graph = import_graph()
    assert not [(a, b) for a, t in graph.items() if a.startswith("model") for b in t if b.startswith("sdk_builder")]
    assert not [a for a, t in graph.items() if "sdk_builder.cli" in t]


def test_the_phone_side_imports_only_formats_runtime_and_util():
    graph = import_graph()
    for module, allowed in PHONE_SIDE.items():
        assert graph[module] <= allowed, (module, graph[module] - allowed)
    for module in ("sdk_builder.formats", "sdk_builder.util"):
        source = module_files(REPO)[module].read_text()
        assert "import torch" not in source and "executorch" not in source, module


def test_the_client_loads_without_the_exporter():
    code = ("import sys, sdk_builder.client; "
            "print(sorted(m for m in sys.modules if m.startswith(('sdk_builder', 'model', 'executorch.exir'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert eval(out) == ["sdk_builder", "sdk_builder.client", "sdk_builder.formats", "sdk_builder.runtime",
                         "sdk_builder.util"], out


def test_no_import_circles():
    assert import_circles(import_graph()) == []


def test_the_file_format_agrees_with_the_model_constants():
    from model import tbsm
    from sdk_builder import formats

    assert (formats.PADDING_ROW, formats.OOV_ROW, formats.FIRST_REAL_ROW) == (tbsm.PADDING_ROW, tbsm.OOV_ROW, tbsm.RESERVED_ROWS)
    assert tbsm.BEHAVIOR_ROWS == len(formats.BEHAVIORS) + 1 == max(formats.BEHAVIOR_CODES.values()) + 1


if __name__ == "__main__":
    circles = import_circles(import_graph(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO))
    print(f"{len(circles)} import circle(s)")
    for circle in circles:
        print("  " + " <-> ".join(circle))


def test_every_listed_recipe_registers_itself_and_nothing_else():
    import importlib

    from sdk_builder.recipes import RECIPE_MODULES, RECIPE_NAMES, RECIPES, get_recipe

    for module in set(RECIPE_MODULES.values()):
        importlib.import_module(module)
    assert tuple(sorted(RECIPES)) == tuple(sorted(RECIPE_NAMES))
    assert all(get_recipe(name).name == name for name in RECIPE_NAMES)


def test_the_cli_starts_without_torch():
    code = "import sys, sdk_builder.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "False"
