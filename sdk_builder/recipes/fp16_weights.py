"""MLP weights stored in fp16, computed in fp32: shared by the lossy recipes (`int8`, `fp16`).

Every `nn.Linear` of the program (`store_linear_weights_fp16`) keeps its weight in fp16 inside the
XNNPACK delegate. XNNPACK's f32 fully-connected with fp16 static weights
(`xnn_create_fully_connected_nc_f32_f16`) widens them to fp32 once, when the program loads, so a
call runs the same fp32 kernels as before: half the delegate's weight bytes (~6.7 of 15 KB) at the
same latency. ExecuTorch's stock partitioner refuses a linear whose weight and activation dtypes
differ, and decomposes one whose weight is a cast; `Fp16WeightLinearConfig` takes it and
`fold_weight_casts` hands XNNPACK the fp16 tensor itself. Both lean on ExecuTorch internals
(`LinearConfig._get_output_deps`, `ALL_PARTITIONER_CONFIGS`): tests/test_int8.py checks the
delegate's weight bytes, so an upgrade that breaks them fails there.

Weight-only int8 linears (XNNPACK's f32-qc8w kernels, fp32 activations) lower too with a custom
config, but on demo user 3439 they cut the delegate's weights only to 5.0 KB while its graph grew
1.4 KB (model.pte -0.4 KB vs fp16 weights), ran 1000 candidates 29% slower (555 vs 428 us, x86, 1
thread) and drifted 8x more (1.2e-3 vs 1.5e-4); dynamic-int8 linears were slower too
(docs/benchmarks.md, "int8 bundles (issue 6)").

The biases and the constant matrices used through `F.linear` outside an `nn.Linear` (the heads'
`A`, the ones rows of the products) stay fp32.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn


class Fp16Linear(nn.Module):
    """An `nn.Linear` whose weight is stored in fp16 and read as fp32 (`weight`, as the code that
    reads `layer.weight` directly expects); the bias stays fp32."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Parameters, as in nn.Linear: torch.export lifts a buffer reached under two names (`top.2`
        # is also `candidate_rest.1`) twice, and the unused copy stayed in the program (+510 B).
        self.weight_fp16 = nn.Parameter(linear.weight.detach().to(torch.float16).contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_fp16.to(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def store_linear_weights_fp16(program: nn.Module) -> nn.Module:
    """A copy of `program` with every `nn.Linear` an `Fp16Linear`. A copy: a `UserProgram` shares its
    layers with the model it was cut from. A layer reached twice (`top[2]` is also
    `candidate_rest[0]`) stays one module, so its weights stay one tensor."""
    program = copy.deepcopy(program)
    replaced: dict[int, Fp16Linear] = {}
    for parent in list(program.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                if id(child) not in replaced:
                    replaced[id(child)] = Fp16Linear(child)
                setattr(parent, name, replaced[id(child)])
    return program


@functools.cache
def _weight_casts() -> frozenset:
    """A dtype cast as it appears in the ATen program (where the partitioner decides which linears
    to keep whole) and in the edge program."""
    from executorch.exir.dialects._ops import ops as exir_ops

    return frozenset({torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, exir_ops.edge.aten._to_copy.default,
                      exir_ops.edge.dim_order_ops._to_dim_order_copy.default})


def _is_weight_cast(node) -> bool:
    return isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _weight_casts()


def _dtype(node) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def fp16_weight_of(node: torch.fx.Node, ep) -> torch.fx.Node | None:
    """The fp16 constant behind a linear's weight (itself, or cast to fp32), when the activation is
    fp32; else None."""
    from executorch.backends.xnnpack.utils.utils import is_param_node

    weight = node.args[1]
    if _is_weight_cast(weight):
        weight = weight.args[0]
    if _dtype(weight) != torch.float16 or not is_param_node(ep, weight) or _dtype(node.args[0]) != torch.float32:
        return None
    return weight


def fold_weight_casts(graph_module: torch.fx.GraphModule):
    """Edge pass: linear(x, to_fp32(w16)) -> linear(x, w16), so XNNPACK receives the fp16 tensor as a
    static weight (`Fp16WeightLinearConfig`) instead of a cast it would run at every call."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from torch.fx.passes.infra.pass_base import PassResult

    changed = False
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target == exir_ops.edge.aten.linear.default:
            cast = node.args[1]
            if _is_weight_cast(cast) and _dtype(cast.args[0]) == torch.float16:
                node.replace_input_with(cast, cast.args[0])
                if not cast.users:
                    graph_module.graph.erase_node(cast)
                changed = True
    graph_module.recompile()
    return PassResult(graph_module, changed)


def _fp16_weight_linear_config():
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType

    class Fp16WeightLinearConfig(LinearConfig):
        """XNNPACK's LinearConfig, plus fp32 linears whose static weight is fp16: the stock config
        rejects mixed input dtypes (and, before `fold_weight_casts`, a weight that is a cast, which
        gets the linear decomposed). The serializer keeps an fp16 constant fp16, and XNNPACK runs
        f32 x f16-weight fully-connected layers as fp32 ones (weights widened at load)."""

        def check_constraints(self, node, ep) -> bool:
            if fp16_weight_of(node, ep) is None:
                return super().check_constraints(node, ep)
            from executorch.backends.xnnpack.utils.utils import is_param_node

            bias = node.args[2] if len(node.args) > 2 else None
            return (ConfigPrecisionType.FP32 in self.enabled_precision_types and _dtype(node) == torch.float32
                    and (bias is None or (is_param_node(ep, bias) and _dtype(bias) == torch.float32)))

        def get_node_and_deps(self, node, ep) -> list:
            weight = fp16_weight_of(node, ep)
            if weight is None:
                return super().get_node_and_deps(node, ep)
            bias = [node.args[2]] if len(node.args) > 2 and node.args[2] is not None else []
            return [node, weight, *bias, *self._get_output_deps(node, ep, ConfigPrecisionType.FP32)[1]]

    return Fp16WeightLinearConfig


def fp16_weight_partitioners() -> list:
    """`xnnpack_partitioners`, with fp16-weight linears delegated (`Fp16WeightLinearConfig`)."""
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS
    from executorch.backends.xnnpack.partition.config.gemm_configs import LinearConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    config = _fp16_weight_linear_config()
    return [XnnpackPartitioner(configs=[config if c is LinearConfig else c for c in ALL_PARTITIONER_CONFIGS])]


def fp16_weight_passes() -> list:
    return [fold_weight_casts]
