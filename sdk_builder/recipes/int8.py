"""The `int8` recipe: per-row int8 per-user tables, and the accuracy budget checked at build time.

What is quantized: the per-user tables that dominate a bundle's bytes (`INT8_TABLES`: item
embeddings, category embeddings and the per-item candidate features). Each row is stored as int8
with one fp32 scale (symmetric, no zero point: `x ~= q * scale`, |q| <= 127) and read through
`quantized_decomposed::embedding_byte`, a gather that dequantizes only the rows it returns. The
portable `quantized` kernel library runs it (the Python runtime registers it on
`import executorch.kernels.quantized`; native apps link `kernels_quantized`). An all-zero row (the
padding row) gets scale 1 and stays exactly zero.

Not quantized: the user row (`user`, ~30 floats: its int8 copy plus scale would save less than the
extra ops cost) and the shared MLP weights, which XNNPACK runs in fp32 (dynamic-int8 linears were
not faster for these 15-wide layers, see docs/benchmarks.md).

The program's inputs and outputs are those of the fp32 recipes: the contract does not depend on
the recipe. `quantize_program` swaps the tables of a `UserProgram` for `Int8Rows` modules, which
support the same `table[rows]` indexing the program already uses, so `forward` is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from sdk_builder.client import BundleError, encode
from sdk_builder.export import (
    USER_CONSTANTS, UserProgram, compile_program, export_program, load_runtime_method, lower, slice_constants,
)
from sdk_builder.formats import Quantization
from sdk_builder.stamp import ProgramTemplate, StampingError, check_against_export, offset_once

INT8_RECIPE = "int8"
INT8_TABLES = ("item_table", "category_table", "candidate_features")
# The dtype's full range, as ExecuTorch's own int8 embedding recipes pass it; the stored values
# are symmetric, in [-127, 127].
QUANT_MIN, QUANT_MAX = -128, 127
DEFAULT_ACCURACY_BUDGET = 0.01
ON_BUDGET_EXCEEDED = ("fail", "fp32")
FALLBACK_RECIPE = "xnnpack"


def _register_ops() -> None:
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)


@torch.no_grad()
def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [R, D], scales fp32 [R]); an all-zero row stays exactly zero."""
    table = table.detach().to(torch.float32)
    amax = table.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(table / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scales.unsqueeze(1)


class Int8Rows(nn.Module):
    """A per-row int8 table that reads like the fp32 buffer it replaces: `table[rows]`."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        _register_ops()
        q, scales = quantize_rows(table)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scales)

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized_decomposed.embedding_byte.default(
            self.weight, self.scales, None, QUANT_MIN, QUANT_MAX, rows)

    def dequantized(self) -> torch.Tensor:
        return dequantize_rows(self.weight, self.scales)


def quantize_program(program: nn.Module) -> nn.Module:
    """Replace the fp32 per-user tables of a `UserProgram` by `Int8Rows`, in place; returns it."""
    for name in INT8_TABLES:
        table = program._buffers.pop(name, None)
        if table is None:
            raise ValueError(f"{type(program).__name__} has no fp32 buffer {name!r} to quantize")
        setattr(program, name, Int8Rows(table))
    return program


def quantize_constants(constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The int8 program's per-user constants from the fp32 ones, by state-dict name
    (`item_table` -> `item_table.weight` int8 + `item_table.scales` fp32); others unchanged."""
    out = {}
    for name, value in constants.items():
        if name in INT8_TABLES:
            out[f"{name}.weight"], out[f"{name}.scales"] = quantize_rows(value)
        else:
            out[name] = value
    return out


# -- the accuracy budget ------------------------------------------------------------------------
class BudgetExceeded(BundleError):
    """The int8 program drifts from the fp32 model by more than the budget (one-line message)."""


@dataclass
class DriftReport:
    max_abs_drift: float  # int8 program in the ExecuTorch runtime vs the fp32 eager full model
    points: int  # scores compared
    histories: int


def measure_drift(method, requests, reference_scores) -> DriftReport:
    """Max |score drift| of a runtime `method` over encoded requests against reference scores."""
    worst, points = 0.0, 0
    for request, want in zip(requests, reference_scores):
        got = method.execute(request.tensors())[0].numpy().astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - np.asarray(want, dtype=np.float64)))))
        points += len(got)
    return DriftReport(worst, points, len(requests))


# -- stamping: one int8 template per checkpoint ---------------------------------------------------
@dataclass(frozen=True)
class Int8ProgramTemplate(ProgramTemplate):
    """A template whose per-user tables are int8: `stamp` takes the fp32 constants
    (`slice_constants`), quantizes them and writes the int8 rows and their scales."""

    dtypes: dict[str, str] = field(default_factory=dict)  # constant name -> numpy dtype name

    def stamp(self, constants: dict[str, torch.Tensor]) -> bytes:
        out = bytearray(self.program)
        quantized = quantize_constants(constants)
        for name, offset in self.offsets.items():
            array = quantized[name].detach().contiguous().numpy()
            if tuple(array.shape) != self.shapes[name] or str(array.dtype) != self.dtypes[name]:
                raise StampingError(f"constant {name}: shape {tuple(array.shape)} / {array.dtype} does not fit the "
                                    f"template {self.shapes[name]} / {self.dtypes[name]}")
            raw = array.tobytes()
            out[offset : offset + len(raw)] = raw
        return bytes(out)


def int8_program(model: nn.Module, constants: dict[str, torch.Tensor]) -> nn.Module:
    """The eager int8 program of one user from its fp32 constants (`export.slice_constants`)."""
    return quantize_program(UserProgram(model, constants)).eval()


def build_int8_template(model, layout, recipe: str, example, item_category):
    """`stamp.build_template` for the int8 recipe: sentinel constants, quantized, found verbatim once."""
    shapes = {name: tuple(t.shape) for name, t in slice_constants(model, example, item_category, layout).items()}
    rng = np.random.default_rng(0x1A78)
    sentinels = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    program = bytes(lower(export_program(int8_program(model, sentinels)), recipe).buffer)
    quantized = quantize_constants({name: sentinels[name] for name in USER_CONSTANTS})
    offsets, q_shapes, dtypes = {}, {}, {}
    for name, tensor in quantized.items():
        offsets[name] = offset_once(program, tensor.contiguous().numpy().tobytes(), name, recipe)
        q_shapes[name], dtypes[name] = tuple(tensor.shape), str(tensor.numpy().dtype)
    return Int8ProgramTemplate(program, offsets, q_shapes, layout, recipe, dtypes=dtypes)


def check_int8_against_export(template, model, shards, item_category, requests) -> float:
    """`stamp.check_against_export` for int8 templates: stamped vs fully exported int8 programs."""
    return check_against_export(template, model, shards, item_category, requests, make_program=int8_program)


# -- the budget, applied by BundleBuilder.build ---------------------------------------------------
@dataclass
class Int8Outcome:
    program: bytes  # what goes into the bundle: the int8 program, or the fp32 fallback
    cases: list  # golden cases whose scores this program replays
    recipe: str  # the manifest's recipe: "int8", or the fallback's
    quantization: Quantization  # recorded in the manifest
    note: str  # one line for the build output


def apply_accuracy_budget(builder, user_id: int, shard, program: bytes, cases: list) -> Int8Outcome:
    """Measure the int8 program against the fp32 model; keep it, fall back to fp32, or refuse.

    Drift: max |score| difference between `program` in the ExecuTorch runtime and the fp32 eager
    full model, over the user's golden histories (full, short, empty, all-OOV) x every shard item
    plus the unknown id. Within the budget, the golden scores become those of the eager int8
    program, so `verify` replays them within `golden_tolerance` like any bundle.
    """
    from sdk_builder.bundle import _ShardManifest  # bundle.py imports this module

    budget = float(getattr(builder, "accuracy_budget", DEFAULT_ACCURACY_BUDGET))
    policy = getattr(builder, "on_budget_exceeded", "fail")
    if policy not in ON_BUDGET_EXCEEDED:
        raise ValueError(f"on_budget_exceeded {policy!r}: expected one of {ON_BUDGET_EXCEEDED}")
    layout = getattr(builder, "layout", None)
    shard_view = _ShardManifest(builder.ckpt, shard)
    candidates = list(shard_view.items.ids) + [cases[0].candidates[-1]]  # the shard and the golden unknown id
    requests = [(c.history, c.request_time, candidates) for c in cases]
    reference = builder.eager_scores_many(shard, requests)
    encoded = [encode(shard_view, h, t, c) for h, t, c in requests]
    drift = measure_drift(load_runtime_method(program), encoded, reference)
    quantization = Quantization(requested_recipe=INT8_RECIPE, tables=list(INT8_TABLES), accuracy_budget=budget,
                                max_score_drift=drift.max_abs_drift, drift_points=drift.points, fallback=False)
    measured = f"int8 score drift {drift.max_abs_drift:.2e} over {drift.points:,} scores"
    if drift.max_abs_drift <= budget:
        eager = int8_program(builder.model, slice_constants(builder.model, shard, builder.ckpt.item_category, layout))
        golden = []
        with torch.no_grad():
            for case in cases:
                request = encode(shard_view, case.history, case.request_time, case.candidates)
                scores = eager(*request.tensors()).numpy().astype(np.float64)
                golden.append(case.model_copy(update={"scores": [float(s) for s in scores]}))
        return Int8Outcome(program, golden, INT8_RECIPE, quantization, f"{measured} <= budget {budget:g}")
    if policy == "fp32":
        fallback = compile_program(builder.model, shard, builder.ckpt.item_category, FALLBACK_RECIPE, layout)
        return Int8Outcome(fallback, cases, FALLBACK_RECIPE, quantization.model_copy(update={"fallback": True}),
                           f"{measured} > budget {budget:g}: fell back to fp32 ({FALLBACK_RECIPE})")
    raise BudgetExceeded(f"user {user_id}: {measured} exceeds the accuracy budget {budget:g}; not writing the bundle "
                         "(raise --accuracy-budget or pass --on-budget-exceeded fp32)")
