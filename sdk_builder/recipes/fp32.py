"""The fp32 recipes: `xnnpack` (the default: XNNPACK delegates) and `portable` (portable kernels)."""

from __future__ import annotations

import torch

from sdk_builder.recipes.base import Recipe, register


def xnnpack_partitioners() -> list:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return [XnnpackPartitioner()]


def _portable_config():
    from executorch.exir import EdgeCompileConfig

    # Keep aten.linear whole so the runtime uses its optimized kernel instead of portable addmm.
    return EdgeCompileConfig(preserve_ops=[torch.ops.aten.linear.default],
                             _core_aten_ops_exception_list=[torch.ops.aten.linear.default])


XNNPACK = register(Recipe("xnnpack", "fp32, XNNPACK delegates (default)", partitioners=xnnpack_partitioners))
PORTABLE = register(Recipe("portable", "fp32, portable kernels only", edge_config=_portable_config))
