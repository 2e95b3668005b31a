"""`tbsm-sdk inspect`: what takes the bytes of a bundle.

`model.pte` is parsed with ExecuTorch's own deserializer and split into its constant tensors (each
with shape, dtype and bytes), the delegate blobs (XNNPACK graphs) with the weights they reference,
and the rest (flatbuffer structure, headers, alignment padding). Constant tensors carry no names in
a `.pte`: they are named from the program itself, by the input that indexes them
(`hist_items` -> `item_table`, `hist_categories` -> `category_table`, `candidates` ->
`candidate_features`); others are numbered (the user state is an input, not a constant). The JSON files are
split by top-level field (manifest), id lists and golden case. Every file's parts add up to the
file's size exactly, and the files to the bundle's size.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from sdk_builder.formats import GOLDEN, MANIFEST, PROGRAM, SCHEMA, BundleError
from sdk_builder.program import program_spec

TABLE_OF_INPUT = {
    "hist_items": "item_table",
    "hist_categories": "category_table",
    "hist_behaviors": "behavior_table",
    "candidates": "candidate_features",
}
INPUT_NAMES = tuple(t.name for t in program_spec().inputs)
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "DOUBLE": "float64", "CHAR": "int8", "BYTE": "uint8",
           "SHORT": "int16", "INT": "int32", "LONG": "int64", "BOOL": "bool"}


_SERIALIZER_MODULES: dict[str, types.ModuleType] = {}


@contextlib.contextmanager
def _serializer():
    """ExecuTorch's `.pte` deserializer without the exporter. It lives in `executorch.exir`, whose
    package `__init__` imports the whole export stack (torch._dynamo, torchao: ~10x the time of the
    deserializer itself). When the exporter is not loaded, the serializer's modules (it imports
    some lazily, while parsing) live under a bare stand-in for the package, in `sys.modules` only
    while they are used: a later `import executorch.exir` in this process loads the real package."""
    real = sys.modules.get("executorch.exir")
    if real is not None:
        yield _serializer_modules()
        return
    if not _SERIALIZER_MODULES:
        spec = importlib.util.find_spec("executorch.exir")
        stand_in = types.ModuleType("executorch.exir")
        stand_in.__path__ = list(spec.submodule_search_locations)
        stand_in.__spec__ = spec
        _SERIALIZER_MODULES["executorch.exir"] = stand_in
    sys.modules.update(_SERIALIZER_MODULES)
    try:
        yield _serializer_modules()
    finally:
        for name in [n for n in sys.modules if n == "executorch.exir" or n.startswith("executorch.exir.")]:
            _SERIALIZER_MODULES[name] = sys.modules.pop(name)


def _serializer_modules() -> types.SimpleNamespace:
    from executorch.exir import schema
    from executorch.exir._serialize._program import _get_extended_header, deserialize_pte_binary
    from executorch.exir.scalar_type import ScalarType

    return types.SimpleNamespace(schema=schema, ScalarType=ScalarType, deserialize_pte_binary=deserialize_pte_binary,
                                 get_extended_header=_get_extended_header)


def _part(name: str, kind: str, nbytes: int, shape=None, dtype=None, **extra) -> dict[str, Any]:
    part = {"name": name, "kind": kind, "bytes": int(nbytes), "shape": shape, "dtype": dtype}
    part.update(extra)
    return part


def _scalar_type(value) -> str | None:
    schema, ScalarType = _serializer_modules().schema, _serializer_modules().ScalarType
    return ScalarType(value.scalar_type).name if isinstance(value, schema.Tensor) else None


def _is_integer(value) -> bool:
    return _scalar_type(value) in ("SHORT", "INT", "LONG")


def _name_by_shape(tensor, taken: set[str]) -> str | None:
    """The two per-user constants that are not read through an input's gather: the int16 build-time
    positions (one per item row) and the prior's float32 scale (one value)."""
    kind = _serializer_modules().ScalarType(tensor.scalar_type).name
    if kind == "SHORT" and len(tensor.sizes) == 1 and "candidate_position" not in taken:
        return "candidate_position"
    if kind == "FLOAT" and list(tensor.sizes) == [1] and "prior_scale" not in taken:
        return "prior_scale"
    return None


def _constant_names(plan, input_names: list[str]) -> dict[int, str]:
    """value index -> name for constants read through a gather, traced from the kernel calls."""
    schema = _serializer_modules().schema  # inside inspect_program's `with _serializer()`

    values = plan.values
    origin = {v: input_names[k] for k, v in enumerate(plan.inputs) if k < len(input_names)}

    def is_constant(v: int) -> bool:
        val = values[v].val
        return isinstance(val, schema.Tensor) and val.data_buffer_idx > 0

    def table_name(index_value: int) -> str | None:
        if index_value in origin:
            return TABLE_OF_INPUT.get(origin[index_value])
        return None

    names: dict[int, str] = {}
    for chain in plan.chains:
        for instruction in chain.instructions:
            call = instruction.instr_args
            if not isinstance(call, schema.KernelCall):
                continue
            op = plan.operators[call.op_index].name
            args = call.args
            if op == "quantized_decomposed::embedding_byte":
                name = table_name(args[5])
                if name:
                    names.setdefault(args[0], name)
                    names.setdefault(args[1], f"{name}.scales")
                    if is_constant(args[2]):
                        names.setdefault(args[2], f"{name}.zero_points")
            elif op == "aten::index":
                items = getattr(values[args[1]].val, "items", [])
                index = next((i for i in items if i is not None and i >= 0), None)
                name = table_name(index) if index is not None else None
                table = values[args[0]].val
                if name == "candidate_features" and _is_integer(table):  # two tables are read by candidate row
                    name = "candidate_category"
                elif name == "item_table" and _is_integer(table):  # the co-visit lists (int16)
                    name = "item_neighbors"
                elif name == "item_table" and _scalar_type(table) == "BYTE":  # and their count codes (uint8)
                    name = "neighbor_weights"
                if name:
                    names.setdefault(args[0], name)
            elif op in ("aten::embedding", "aten::index_select"):
                weight, index = (args[0], args[1]) if op == "aten::embedding" else (args[0], args[2])
                name = table_name(index)
                if name:
                    names.setdefault(weight, name)
    return names


def inspect_program(data: bytes, input_names: list[str] | None = None) -> list[dict[str, Any]]:
    """Parts of a `.pte`, summing to len(data)."""
    with _serializer():
        return _inspect_program(data, input_names)


def _inspect_program(data: bytes, input_names: list[str] | None) -> list[dict[str, Any]]:
    serializer = _serializer_modules()
    schema, ScalarType = serializer.schema, serializer.ScalarType
    deserialize_pte_binary, _get_extended_header = serializer.deserialize_pte_binary, serializer.get_extended_header

    try:
        pte = deserialize_pte_binary(bytes(data))
    except Exception as exc:  # the flatbuffer parser raises assorted errors on bad input
        raise BundleError(f"{PROGRAM}: not an ExecuTorch program ({type(exc).__name__})") from None
    program = pte.program
    parts: list[dict[str, Any]] = []
    names: dict[int, str] = {}
    for plan in program.execution_plan:
        names.update(_constant_names(plan, list(input_names or INPUT_NAMES)))
        seen_buffers: set[int] = set()
        unnamed = 0
        for v, value in enumerate(plan.values):
            tensor = value.val
            if not isinstance(tensor, schema.Tensor) or tensor.data_buffer_idx <= 0:
                continue
            if tensor.data_buffer_idx in seen_buffers:
                continue
            seen_buffers.add(tensor.data_buffer_idx)
            storage = program.constant_buffer[tensor.data_buffer_idx].storage
            name = names.get(v) or _name_by_shape(tensor, set(names.values()))
            names.setdefault(v, name)
            if name is None:
                name = f"constant #{unnamed}"
                unnamed += 1
            dtype = _DTYPES.get(ScalarType(tensor.scalar_type).name, ScalarType(tensor.scalar_type).name.lower())
            try:
                nbytes = int(np.prod(tensor.sizes, dtype=np.int64)) * np.dtype(dtype).itemsize
            except TypeError:  # a dtype numpy does not know: count the stored bytes
                nbytes = len(storage)
            # storage may carry alignment padding: that goes to the overhead line
            parts.append(_part(name, "constant", min(nbytes, len(storage)), list(tensor.sizes), dtype))

    named = pte.named_data
    named_sizes: dict[str, int] = {}
    if named is not None:
        by_buffer: dict[int, str] = {}
        for key, entry in named.pte_data.items():
            by_buffer.setdefault(entry.buffer_index, key)
        named_sizes = {key: len(named.buffers[i]) for i, key in by_buffer.items()}
    claimed: set[str] = set()
    inline = program.backend_delegate_data
    for plan in program.execution_plan:
        for k, delegate in enumerate(plan.delegates):
            processed = delegate.processed
            blob = bytes(inline[processed.index].data) if processed.location == schema.DataLocation.INLINE else b""
            if not blob and program.segments:
                segment = program.segments[processed.index]
                blob = b"\0" * segment.size
            parts.append(_part(f"{delegate.id} #{k}: graph", "delegate", len(blob)))
            keys = [key for key in named_sizes if key not in claimed and key.encode() in blob]
            claimed.update(keys)
            if keys:
                parts.append(_part(f"{delegate.id} #{k}: weights ({len(keys)} tensors)", "delegate_weights",
                                   sum(named_sizes[key] for key in keys)))
    rest = [key for key in named_sizes if key not in claimed]
    if rest:
        parts.append(_part(f"named data ({len(rest)} entries)", "named_data", sum(named_sizes[key] for key in rest)))
    header = _get_extended_header(bytes(data))
    overhead = len(data) - sum(p["bytes"] for p in parts)
    parts.append(_part("flatbuffer structure, headers, alignment padding", "overhead", overhead,
                       program_flatbuffer_bytes=header.program_size if header else len(data)))
    return parts


def _fragment(key: str, value: Any) -> int:
    return len(json.dumps({key: value}, sort_keys=True, separators=(",", ":")).encode()) - 2


def _json(data: bytes, name: str) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{name}: not valid JSON ({exc})") from None


def inspect_manifest(data: bytes) -> list[dict[str, Any]]:
    doc = _json(data, MANIFEST)
    parts = []
    for key in sorted(doc):
        value = doc[key]
        if key in ("items", "categories") and isinstance(value, dict) and "ids" in value:
            ids = value["ids"]
            rest = {k: v for k, v in value.items() if k != "ids"}
            parts.append(_part(f"{key}.ids ({len(ids)} ids)", "manifest", _fragment("ids", ids)))
            parts.append(_part(f"{key} (other fields)", "manifest", _fragment(key, rest) + 1))
        else:
            parts.append(_part(key, "manifest", _fragment(key, value)))
    parts.append(_part("JSON punctuation, newline", "overhead", len(data) - sum(p["bytes"] for p in parts)))
    return parts


def inspect_golden(data: bytes) -> list[dict[str, Any]]:
    doc = _json(data, GOLDEN)
    parts = []
    for case in doc.get("cases", []):
        size = len(json.dumps(case, sort_keys=True, separators=(",", ":")).encode())
        parts.append(_part(f"case {case.get('name', '?')} ({len(case.get('candidates', []))} candidates, "
                           f"{len(case.get('history', {}).get('events', []))} events)", "golden", size))
    parts.append(_part("other fields, JSON punctuation", "overhead", len(data) - sum(p["bytes"] for p in parts)))
    return parts


def inspect_bundle(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path / MANIFEST}: missing (is {path} a bundle directory?)")
    manifest = _json((path / MANIFEST).read_bytes(), MANIFEST)
    input_names = [i.get("name") for i in manifest.get("program", {}).get("inputs", [])] or list(INPUT_NAMES)
    files = []
    order = [PROGRAM, MANIFEST, GOLDEN, SCHEMA]
    others = sorted(p.name for p in path.iterdir() if p.is_file() and p.name not in order)
    for name in order + others:
        file = path / name
        if not file.is_file():
            continue
        data = file.read_bytes()
        if name == PROGRAM:
            parts = inspect_program(data, input_names)
        elif name == MANIFEST:
            parts = inspect_manifest(data)
        elif name == GOLDEN:
            parts = inspect_golden(data)
        elif name.endswith(".pte"):  # the refresh program: constants unnamed
            parts = inspect_program(data, [])
        else:
            parts = [_part(name, "file", len(data))]
        files.append({"name": name, "bytes": len(data), "parts": parts})
    return {"bundle": str(path), "kind": manifest.get("kind", "personal"), "user_id": manifest.get("user_id"), "recipe": manifest.get("recipe"),
            "quantization": manifest.get("quantization"), "total_bytes": sum(f["bytes"] for f in files),
            "files": files}


def format_report(report: dict[str, Any]) -> str:
    total = report["total_bytes"] or 1
    lines = [f"{report['bundle']}: {report['total_bytes']:,} B, recipe {report['recipe']}"
             + (", cold start (no user)" if report.get("kind") == "cold_start" else "")]
    q = report.get("quantization")
    if q:
        lines[0] += (f" (requested {q['requested_recipe']}, drift {q['max_score_drift']:.2e}, "
                     f"budget {q['accuracy_budget']:g}{', fell back to fp32' if q['fallback'] else ''})")
    width = max([len(p["name"]) + 2 for f in report["files"] for p in f["parts"]] + [30])
    lines.append(f"{'file / part':<{width}} {'shape':<12} {'dtype':<8} {'bytes':>9} {'%':>6}")
    for f in report["files"]:
        lines.append(f"{f['name']:<{width}} {'':<12} {'':<8} {f['bytes']:>9,} {100 * f['bytes'] / total:>5.1f}%")
        for p in f["parts"]:
            shape = "x".join(map(str, p["shape"])) if p.get("shape") is not None else ""
            lines.append(f"{'  ' + p['name']:<{width}} {shape or '-':<12} {p.get('dtype') or '-':<8} "
                         f"{p['bytes']:>9,} {100 * p['bytes'] / total:>5.1f}%")
    lines.append(f"{'total':<{width}} {'':<12} {'':<8} {report['total_bytes']:>9,} 100.0%")
    return "\n".join(lines)
