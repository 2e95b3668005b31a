"""What a recipe is, and `register` (the registry itself, torch-free, is `sdk_builder.recipes`).

A recipe turns one user's constants into a `.pte`: which eager program to build from them (the fp32
`UserProgram`, or one with int8 tables), how its per-user constants are stored in the program (so a
template can be stamped), and how the exported program is lowered (partitioner, edge config).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from model.tbsm import TBSM
from sdk_builder.program import Shard, SliceLayout, UserProgram, export_program, slice_constants
from sdk_builder.recipes import DEFAULT_RECIPE, RECIPES, get_recipe

Constants = dict[str, torch.Tensor]


def _as_stored(constants: Constants) -> Constants:
    return dict(constants)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    # () -> the partitioners of `to_edge_transform_and_lower` ([] : portable kernels only).
    partitioners: Callable[[], list] = list
    # () -> passes run on the edge program before partitioning ([] : none).
    edge_passes: Callable[[], list] = list
    # () -> an EdgeCompileConfig, or None for ExecuTorch's default.
    edge_config: Callable[[], object | None] = lambda: None
    # (model, fp32 constants from `slice_constants`) -> the eager program that is exported.
    program: Callable[[TBSM, Constants], nn.Module] = UserProgram
    # fp32 constants -> the constants as the program stores them, by state-dict name (stamping).
    stored_constants: Callable[[Constants], Constants] = _as_stored
    # Lossy recipes are measured against the fp32 model at build time (bundle/budget.py).
    quantized_tables: tuple[str, ...] = field(default=())
    fallback: str | None = None  # the lossless recipe a lossy one may fall back to

    @property
    def lossy(self) -> bool:
        return bool(self.quantized_tables)

    def lower(self, exported: torch.export.ExportedProgram):
        from executorch.exir import to_edge_transform_and_lower

        edge = to_edge_transform_and_lower(exported, transform_passes=self.edge_passes() or None,
                                           partitioner=self.partitioners() or None, compile_config=self.edge_config())
        return edge.to_executorch(backend_config())

    def to_pte(self, module: nn.Module) -> bytes:
        """torch.export + lowering of an eager program: the bytes of its `.pte`."""
        return bytes(self.lower(export_program(module)).buffer)

    def compile(self, model: TBSM, constants: Constants) -> bytes:
        return self.to_pte(self.program(model, constants))


def backend_config():
    """Lowering settings shared by every program we write. Segments 16-byte aligned, not 128: the
    XNNPACK weights are ~20 small segments (60-1,320 bytes), and 128-byte alignment padded them by
    ~1.5 KB a bundle. The runtime copies and repacks them at load, so 16 (what a float tensor needs)
    is all it asks for."""
    from executorch.exir import ExecutorchBackendConfig

    return ExecutorchBackendConfig(extract_delegate_segments=False, segment_alignment=16)


def register(recipe: Recipe) -> Recipe:
    if recipe.name in RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is registered twice")
    RECIPES[recipe.name] = recipe
    return recipe


def compile_program(model: TBSM, shard: Shard, item_category: np.ndarray, recipe: str | Recipe = DEFAULT_RECIPE,
                    layout: SliceLayout | None = None) -> bytes:
    """One user's full export (no stamping): slice, build the recipe's program, export, lower."""
    return get_recipe(recipe).compile(model, slice_constants(model, shard, item_category, layout))
