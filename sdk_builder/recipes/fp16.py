"""The `fp16` recipe: the fp32 program with its per-user float tables stored in fp16.

`item_table`, `category_table` and `candidate_features` hold ~89 KB of an fp32 bundle; in fp16 they
take half. Rows are gathered and cast to fp32, and everything after the gather (XNNPACK's linears,
the attention, the prior) runs in fp32 as in `xnnpack`. The MLP weights are stored in fp16 too and
widened to fp32 when the program loads (`fp16_weights.store_linear_weights_fp16`): ~6.7 KB less delegate
data, the same kernels at run time. Rounding to fp16 keeps each value's exponent and 11
significant bits (relative error <= 2**-11), so the scores move far less than int8's
(docs/benchmarks.md, "Bundle size and drift by recipe"); like every lossy recipe, the drift is
measured against the fp32 model at build time and checked against the accuracy budget
(`sdk_builder/bundle/budget.py`).
Inputs, outputs and the client contract are those of the fp32 recipes.
"""

from __future__ import annotations

import torch
from torch import nn

from sdk_builder.program import UserProgram
from sdk_builder.recipes.base import Recipe, register
from sdk_builder.recipes.fp16_weights import fp16_weight_partitioners, fp16_weight_passes, store_linear_weights_fp16
from sdk_builder.recipes.int8 import quantize_constants, quantize_program

FP16_TABLES = ("item_table", "category_table", "candidate_features")


def fp16_program(model: nn.Module, constants: dict[str, torch.Tensor]) -> nn.Module:
    """The eager fp16-table program of one user from its fp32 constants (`program.slice_constants`)."""
    program = quantize_program(UserProgram(model, constants), int8_tables=(), fp16_tables=FP16_TABLES)
    return store_linear_weights_fp16(program).eval()


def fp16_constants(constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return quantize_constants(constants, int8_tables=(), fp16_tables=FP16_TABLES)


FP16 = register(Recipe("fp16", "fp16 per-user tables and MLP weights, fp32 compute + XNNPACK, "
                               "checked against an accuracy budget",
                       partitioners=fp16_weight_partitioners, edge_passes=fp16_weight_passes, program=fp16_program,
                       stored_constants=fp16_constants, quantized_tables=FP16_TABLES, fallback="xnnpack"))
