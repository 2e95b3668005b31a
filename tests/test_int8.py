"""The lossy recipes (int8, fp16): real .pte files in the real ExecuTorch runtime, the accuracy budget, `inspect`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdk_builder.bundle.budget import BudgetExceeded
from sdk_builder.bundle.build import BundleBuilder
from sdk_builder.bundle.golden import ShardView
from sdk_builder.bundle.verify import verify_bundle
from sdk_builder.client import Bundle, encode
from sdk_builder.formats import BundleError
from sdk_builder.program import slice_constants
from sdk_builder.runtime import load_runtime_method
from sdk_builder.stamp import build_template
from sdk_builder.formats import Event, EventHistory
from sdk_builder.recipes.int8 import Int8Rows, int8_program, quantize_rows

CLI = [sys.executable, "-m", "sdk_builder.cli"]
SHARD = "300"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


def manifest_of(path: Path) -> dict:
    return json.loads((Path(path) / "manifest.json").read_text())


def program_parts(bundle: Path) -> list[dict]:
    """`tbsm-sdk inspect`'s parts of a bundle's model.pte."""
    from sdk_builder.bundle.inspect import inspect_program

    return inspect_program((Path(bundle) / "model.pte").read_bytes())


def input_meta(pte: Path) -> list:
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime

    meta = Runtime.get().load_program(str(pte)).metadata("forward")
    return [(tuple(meta.input_tensor_meta(i).sizes()), meta.input_tensor_meta(i).dtype()) for i in range(meta.num_inputs())] + [
        (tuple(meta.output_tensor_meta(i).sizes()), meta.output_tensor_meta(i).dtype()) for i in range(meta.num_outputs())]


@pytest.fixture(scope="module")
def user_id(builder) -> int:
    return int(builder.ckpt.users.ids[4])


@pytest.fixture(scope="module")
def cli_builds(builder, user_id, tmp_path_factory) -> dict:
    """The two CLI builds of this module, started at once so they overlap with the in-process ones:
    budget 1e-9 (must fail) and budget 1e-9 with --on-budget-exceeded fp32 (an fp32 bundle)."""
    run = str(builder.ckpt.path.parent)
    started = {}
    for name, extra in (("fail", []), ("fallback", ["--on-budget-exceeded", "fp32", "--json"])):
        out = tmp_path_factory.mktemp(name)
        cmd = [*CLI, "build", run, "--user-shard", str(user_id), "--out", str(out), "--shard-size", SHARD,
               "--recipe", "int8", "--accuracy-budget", "1e-9", *extra]
        started[name] = (out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    yield {name: (out, proc) for name, (out, proc) in started.items()}
    for _, proc in started.values():
        if proc.poll() is None:
            proc.kill()


def finished(cli_builds: dict, name: str) -> tuple[Path, subprocess.CompletedProcess]:
    out, proc = cli_builds[name]
    stdout, stderr = proc.communicate(timeout=600)
    return out, subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def int8_builder(builder):
    return BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="int8", stamping=False)


@pytest.fixture(scope="module")
def int8_bundle(int8_builder, user_id, cli_builds, tmp_path_factory):
    return int8_builder.build(user_id, tmp_path_factory.mktemp("int8"))


@pytest.fixture(scope="module")
def fp16_bundle(builder, user_id, tmp_path_factory):
    fp16_builder = BundleBuilder(builder.ckpt, builder.data, builder.policy, recipe="fp16", stamping=False)
    return fp16_builder.build(user_id, tmp_path_factory.mktemp("fp16"))


@pytest.fixture(scope="module")
def fallback_bundle(cli_builds) -> Path:
    _, result = finished(cli_builds, "fallback")
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)["bundles"][0]
    assert row["recipe"] == "xnnpack" and "fell back to fp32" in row["note"]
    return Path(row["path"])


def test_quantize_rows_keeps_zero_rows_exact_and_bounds_the_error():
    table = torch.randn(50, 16)
    table[0] = 0
    q, scales = quantize_rows(table)
    assert q.dtype == torch.int8 and scales.dtype == torch.float16 and scales.shape == (50,)
    back = q.to(torch.float32) * scales[:, None].to(torch.float32)
    assert torch.equal(back[0], torch.zeros(16))
    assert bool(((back - table).abs() <= scales[:, None].to(torch.float32) / 2 + 1e-7).all())


def test_eager_int8_rows_equal_the_runtime_kernel_exactly():
    """The golden scores of an int8 bundle come from the eager program: its int8 gather must give the
    runtime kernel's values bit for bit (the op's eager implementation multiplies in fp16)."""
    from executorch.exir import to_edge_transform_and_lower

    class Gather(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = Int8Rows(torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 0.3)

        def forward(self, rows: torch.Tensor) -> torch.Tensor:
            return self.table[rows]

    gather, rows = Gather().eval(), torch.arange(300)
    exported = torch.export.export(gather, (rows,), strict=False)
    runtime = load_runtime_method(bytes(to_edge_transform_and_lower(exported).to_executorch().buffer))
    assert torch.equal(runtime.execute([rows])[0], gather(rows))


def test_int8_bundle_builds_verifies_and_stays_within_budget(int8_bundle):
    assert int8_bundle.recipe == "int8" and "<= budget" in int8_bundle.note
    manifest = manifest_of(int8_bundle.path)
    q = manifest["quantization"]
    assert manifest["recipe"] == "int8" and q["requested_recipe"] == "int8" and not q["fallback"]
    assert 0 < q["max_score_drift"] <= q["accuracy_budget"] == 0.01 and q["drift_points"] > 1000
    assert set(q["tables"]) == {"item_table", "category_table", "candidate_features"}
    report = verify_bundle(int8_bundle.path)  # golden vectors (the int8 program's eager scores) in the runtime
    assert report["ok"] and report["max_abs_diff"] <= manifest["golden_tolerance"]


def test_int8_bundle_ranks_like_any_bundle(int8_bundle, builder):
    bundle = Bundle(int8_bundle.path)
    ids = bundle.manifest.items.ids
    history = EventHistory(user_id=bundle.manifest.user_id, events=[
        Event(item_id=ids[k], category_id=bundle.manifest.categories.ids[0], behavior="pv", timestamp=1_512_000_000 + k)
        for k in range(5)])
    scores = bundle.score(history, 1_512_100_000, ids[:50] + [10**12])
    assert scores.shape == (51,) and np.all((scores > 0) & (scores < 1))


def test_padding_row_is_exactly_zero(int8_builder, user_id):
    shard, _ = int8_builder.shard_for(int8_builder.user_row(user_id))
    program = int8_program(int8_builder.model, slice_constants(int8_builder.model, shard, int8_builder.ckpt.item_category,
                                                               int8_builder.layout))
    zero = torch.zeros(1, dtype=torch.long)
    for table, dtype in ((program.item_table, torch.int8), (program.category_table, torch.float16),
                         (program.candidate_features, torch.float16)):
        assert table.weight.dtype == dtype
        assert torch.count_nonzero(table[zero]) == 0


def test_int8_is_smaller_than_fp32_with_the_same_contract(int8_bundle, fallback_bundle):
    fp32 = fallback_bundle
    assert manifest_of(fp32)["recipe"] == "xnnpack" and manifest_of(fp32)["quantization"]["fallback"] is True
    assert verify_bundle(fp32)["ok"]
    int8_pte, fp32_pte = int8_bundle.path / "model.pte", fp32 / "model.pte"
    assert int8_pte.stat().st_size < fp32_pte.stat().st_size
    tables = ("item_table", "category_table", "candidate_features")
    table_bytes = lambda bundle, names: sum(p["bytes"] for p in program_parts(bundle) if p["name"] in names)  # noqa: E731
    fp32_tables = table_bytes(fp32, tables)
    int8_tables = table_bytes(int8_bundle.path, tables + tuple(f"{t}.scales" for t in tables))
    # items: 1 byte per value plus a 2-byte scale per row; categories and candidate features: 2 bytes
    # per value; vs 4 bytes per value
    assert int8_tables < 0.45 * fp32_tables
    assert fp32_pte.stat().st_size - int8_pte.stat().st_size >= 0.9 * (fp32_tables - int8_tables)
    total = lambda p: sum(f.stat().st_size for f in Path(p).iterdir())  # noqa: E731
    assert total(int8_bundle.path) < total(fp32)
    assert manifest_of(int8_bundle.path)["program"] == manifest_of(fp32)["program"]
    assert input_meta(int8_pte) == input_meta(fp32_pte)  # what the runtime itself reports


def test_budget_exceeded_fails_with_one_line(cli_builds, user_id):
    out, result = finished(cli_builds, "fail")
    assert result.returncode != 0
    message = last_line(result.stderr).strip()
    assert message.startswith("Error: ") and "exceeds the accuracy budget 1e-09" in message and str(user_id) in message
    assert "Traceback" not in result.stderr
    assert not list(out.rglob("model.pte"))


def test_budget_error_is_a_bundle_error():
    assert issubclass(BudgetExceeded, BundleError)


def test_inspect_json_adds_up_to_the_file_sizes(int8_bundle):
    result = run_cli("inspect", str(int8_bundle.path), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    sizes = {p.name: p.stat().st_size for p in int8_bundle.path.iterdir()}
    assert {f["name"]: f["bytes"] for f in report["files"]} == sizes
    assert report["total_bytes"] == sum(sizes.values())
    for f in report["files"]:
        assert sum(p["bytes"] for p in f["parts"]) == f["bytes"], f["name"]
    program = {p["name"]: p for p in report["files"][0]["parts"]}
    assert report["files"][0]["name"] == "model.pte" and report["recipe"] == "int8"
    assert program["item_table"]["dtype"] == "int8" and program["item_table.scales"]["dtype"] == "float16"
    assert program["item_table"]["bytes"] == int(np.prod(program["item_table"]["shape"]))
    for table in ("category_table", "candidate_features"):
        assert program[table]["dtype"] == "float16" and f"{table}.scales" not in program
        assert program[table]["bytes"] == 2 * int(np.prod(program[table]["shape"]))
    assert any(p["kind"] == "delegate" for p in program.values())
    from sdk_builder.bundle.inspect import format_report

    human = format_report(report)
    assert "item_table" in human and "manifest.json" in human and f"{report['total_bytes']:,}" in human


def test_stamped_int8_program_matches_the_full_export(int8_builder, int8_bundle, user_id):
    """The default path for many users: one int8 template, each user's constants stamped in. The
    stamped program must run exactly like the fully exported one of the same user."""
    builder = int8_builder
    shard, _ = builder.shard_for(builder.user_row(user_id))
    other, _ = builder.shard_for(builder.user_row(int(builder.ckpt.users.ids[9])))
    template = build_template(builder.model, builder.layout, "int8", other, builder.ckpt.item_category)
    stamped = template.stamp(slice_constants(builder.model, shard, builder.ckpt.item_category, builder.layout))
    exported = (int8_bundle.path / "model.pte").read_bytes()
    assert len(stamped) == len(exported)
    a, b = load_runtime_method(stamped), load_runtime_method(exported)
    view = ShardView(builder.ckpt, shard)
    for case in builder.golden_requests(user_id, shard):
        request = encode(view, case.history, case.request_time, list(view.items.ids) + [10**12]).tensors()
        assert torch.equal(a.execute(request)[0], b.execute(request)[0])


def test_int8_drift_stays_within_budget_without_the_prior_blend(int8_builder):
    """The budget must hold for a model whose logit is not scaled down by a prior blend (prior
    weight 0): per-row int8 candidate features and category rows drifted beyond it (issue 12)."""
    from sdk_builder.program import UserProgram
    from sdk_builder.recipes import DEFAULT_ACCURACY_BUDGET

    builder, model = int8_builder, int8_builder.ckpt.model.eval()
    worst = 0.0
    with torch.no_grad():
        for user_id in builder.ckpt.users.ids[:8]:
            shard, _ = builder.shard_for(builder.user_row(int(user_id)))
            constants = slice_constants(model, shard, builder.ckpt.item_category, builder.layout)
            fp32, int8 = UserProgram(model, constants).eval(), int8_program(model, constants)
            view = ShardView(builder.ckpt, shard)
            for case in builder.golden_requests(int(user_id), shard):
                request = encode(view, case.history, case.request_time, list(view.items.ids) + [10**12]).tensors()
                worst = max(worst, float((int8(*request) - fp32(*request)).abs().max()))
    assert 0 < worst <= DEFAULT_ACCURACY_BUDGET / 2


def test_fp16_bundle_halves_the_float_tables_and_drifts_less_than_int8(fp16_bundle, int8_bundle, fallback_bundle):
    manifest = manifest_of(fp16_bundle.path)
    q = manifest["quantization"]
    assert manifest["recipe"] == "fp16" and q["requested_recipe"] == "fp16" and not q["fallback"]
    assert set(q["tables"]) == {"item_table", "category_table", "candidate_features"}
    # fp16 keeps 11 significant bits of every value: a drift, but well below int8's
    assert 0 < q["max_score_drift"] < manifest_of(int8_bundle.path)["quantization"]["max_score_drift"]
    report = verify_bundle(fp16_bundle.path)
    assert report["ok"] and report["max_abs_diff"] <= manifest["golden_tolerance"]
    fp16_pte, fp32_pte = fp16_bundle.path / "model.pte", fallback_bundle / "model.pte"
    fp16_parts, fp32_parts = ({p["name"]: p for p in program_parts(b)} for b in (fp16_bundle.path, fallback_bundle))
    for table in q["tables"]:
        assert fp16_parts[table]["dtype"] == "float16" and fp32_parts[table]["dtype"] == "float32"
        assert 2 * fp16_parts[table]["bytes"] == fp32_parts[table]["bytes"]
    saved = sum(fp32_parts[t]["bytes"] - fp16_parts[t]["bytes"] for t in q["tables"])
    assert fp32_pte.stat().st_size - fp16_pte.stat().st_size >= 0.9 * saved
    assert manifest["program"] == manifest_of(fallback_bundle)["program"]
    assert input_meta(fp16_pte) == input_meta(fp32_pte)


def test_lossy_bundles_store_the_mlp_weights_in_fp16(int8_builder, user_id, int8_bundle, fp16_bundle, fallback_bundle):
    """Issue 12: every nn.Linear weight of the program sits in the XNNPACK delegate as fp16 (XNNPACK
    widens it to fp32 at load), so the delegate's weight bytes are those of the fp32 bundle minus 2
    bytes a weight value; the biases and the other constants stay fp32."""
    from torch import nn

    from sdk_builder.program import UserProgram

    shard, _ = int8_builder.shard_for(int8_builder.user_row(user_id))
    model = int8_builder.model
    program = UserProgram(model, slice_constants(model, shard, int8_builder.ckpt.item_category, int8_builder.layout))
    values = sum(m.weight.numel() for m in program.modules() if type(m) is nn.Linear)  # modules(): each layer once

    def delegate_weights(bundle: Path) -> int:
        return sum(part["bytes"] for part in program_parts(bundle) if part["kind"] == "delegate_weights")

    fp32 = delegate_weights(fallback_bundle)
    assert values > 0 and fp32 > 4 * values
    for bundle in (int8_bundle, fp16_bundle):
        assert fp32 - delegate_weights(bundle.path) == 2 * values, bundle.recipe
