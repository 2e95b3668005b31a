"""The accuracy budget of lossy recipes (int8): measured at build time, per bundle.

Drift: max |score| difference between the lossy program in the ExecuTorch runtime and a reference
(the fp32 eager full model) over the user's golden histories (full, short, empty, all-OOV) x every
shard item plus the unknown id. Within the budget the golden scores become those of the recipe's
eager program, so `verify` replays them within `golden_tolerance` like any bundle; beyond it the
bundle is refused, or built with the recipe's lossless fallback (recorded in the manifest).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from sdk_builder.bundle.golden import Request
from sdk_builder.client import encode
from sdk_builder.formats import BundleError, GoldenCase, Quantization
from sdk_builder.recipes import DEFAULT_ACCURACY_BUDGET, ON_BUDGET_EXCEEDED
from sdk_builder.recipes.base import Recipe
from sdk_builder.runtime import load_runtime_method


class BudgetExceeded(BundleError):
    """The lossy program drifts from the fp32 model by more than the budget (one-line message)."""


@dataclass
class DriftReport:
    max_abs_drift: float  # the program in the ExecuTorch runtime vs the reference scores
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


@dataclass
class BudgetOutcome:
    program: bytes  # what goes into the bundle: the lossy program, or the fallback
    cases: list[GoldenCase]  # golden cases whose scores this program replays
    recipe: str  # the manifest's recipe: the requested one, or the fallback's
    quantization: Quantization  # recorded in the manifest
    note: str  # one line for the build output


def apply_accuracy_budget(recipe: Recipe, program: bytes, cases: list[GoldenCase], manifest_view, *,
                          reference_scores: Callable[[list[Request]], list[np.ndarray]],
                          eager_program: Callable[[], nn.Module], fallback_program: Callable[[], bytes],
                          budget: float = DEFAULT_ACCURACY_BUDGET, on_exceeded: str = "fail",
                          user_id: int) -> BudgetOutcome:
    """Measure `program` (of a lossy `recipe`) against `reference_scores`; keep it, fall back, or refuse.

    `manifest_view` maps ids to rows (`encode`); `eager_program()` is the recipe's eager program of
    this user (it rescores the golden cases); `fallback_program()` compiles the fallback recipe.
    """
    if on_exceeded not in ON_BUDGET_EXCEEDED:
        raise ValueError(f"on_budget_exceeded {on_exceeded!r}: expected one of {ON_BUDGET_EXCEEDED}")
    candidates = list(manifest_view.items.ids) + [cases[0].candidates[-1]]  # the shard and the golden unknown id
    requests = [(c.history, c.request_time, candidates) for c in cases]
    reference = reference_scores(requests)
    encoded = [encode(manifest_view, h, t, c) for h, t, c in requests]
    drift = measure_drift(load_runtime_method(program), encoded, reference)
    quantization = Quantization(requested_recipe=recipe.name, tables=list(recipe.quantized_tables), accuracy_budget=budget,
                                max_score_drift=drift.max_abs_drift, drift_points=drift.points, fallback=False)
    measured = f"{recipe.name} score drift {drift.max_abs_drift:.2e} over {drift.points:,} scores"
    if drift.max_abs_drift <= budget:
        eager = eager_program()
        golden = []
        with torch.no_grad():
            for case in cases:
                request = encode(manifest_view, case.history, case.request_time, case.candidates)
                scores = eager(*request.tensors()).numpy().astype(np.float64)
                golden.append(case.model_copy(update={"scores": [float(s) for s in scores]}))
        return BudgetOutcome(program, golden, recipe.name, quantization, f"{measured} <= budget {budget:g}")
    if on_exceeded == "fp32":
        return BudgetOutcome(fallback_program(), cases, recipe.fallback, quantization.model_copy(update={"fallback": True}),
                             f"{measured} > budget {budget:g}: fell back to fp32 ({recipe.fallback})")
    raise BudgetExceeded(f"user {user_id}: {measured} exceeds the accuracy budget {budget:g}; not writing the bundle "
                         "(raise --accuracy-budget or pass --on-budget-exceeded fp32)")
