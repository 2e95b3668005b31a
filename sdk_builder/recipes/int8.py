"""The `int8` recipe: lossy per-user tables, and the accuracy budget checked at build time.

What is stored lossy: the per-user tables that dominate a bundle's bytes.
- `item_table` (`INT8_TABLES`): each row as int8 with one fp16 scale (symmetric, no zero point:
  `x ~= q * scale`, |q| <= 127), read through `quantized_decomposed::embedding_byte`, a gather that
  dequantizes only the rows it returns. The portable `quantized` kernel library runs it (the Python
  runtime registers it on `import executorch.kernels.quantized`; native apps link
  `kernels_quantized`). An all-zero row (the padding row) gets scale 1 and stays exactly zero.
- `category_table` and `candidate_features` (`FP16_TABLES`): fp16, gathered
  and cast to fp32. Their values feed the first candidate layer directly and with
  large weights: per-row int8 drifted up to 4.5e-2 in score for a model without the prior blend
  (the 5 candidate features of a row differ in scale by orders of magnitude, so one row scale
  rounds the small ones away); fp16 keeps each value's own exponent for 2 bytes, about the bytes
  of int8 plus a per-row fp32 scale (docs/benchmarks.md, "int8 size").

Shared MLP weights (every `nn.Linear` of the program, `store_linear_weights_fp16`): stored in fp16
inside the XNNPACK delegate, computed in fp32. XNNPACK's f32 fully-connected with fp16 static weights
(`xnn_create_fully_connected_nc_f32_f16`) widens them to fp32 once, when the program loads, so a
call runs the same fp32 kernels as before: half the delegate's weight bytes (~6.7 of 15 KB) at the
same latency. ExecuTorch's stock partitioner refuses a linear whose weight and activation dtypes
differ, and decomposes one whose weight is a cast; `Fp16WeightLinearConfig` takes it and
`fold_weight_casts` hands XNNPACK the fp16 tensor itself. Weight-only int8 linears (XNNPACK's
f32-qc8w kernels, fp32 activations) lower too with a custom config, but on demo user 3439 they cut
the delegate's weights only to 5.0 KB while its graph grew 1.4 KB (model.pte -0.4 KB vs fp16
weights), ran 1000 candidates 29% slower (555 vs 428 us, x86, 1 thread) and drifted 8x more
(1.2e-3 vs 1.5e-4); dynamic-int8 linears were slower too (docs/benchmarks.md, "int8 bundles (issue 6)").

Not lossy: the user state (a program input, ~30 floats), the biases and the constant matrices
used through `F.linear` outside an `nn.Linear` (the heads' `A`, the ones rows of the products).

The program's inputs and outputs are those of the fp32 recipes: the contract does not depend on
the recipe. `quantize_program` swaps the tables of a `UserProgram` for `Int8Rows` / `Fp16Rows`
modules, which support the same `table[rows]` indexing the program already uses, so `forward` is
unchanged. The build-time accuracy budget is `sdk_builder/bundle/budget.py`; stamping is
`sdk_builder/stamp.py`.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from sdk_builder.program import UserProgram
from sdk_builder.recipes.base import Recipe, register

INT8_TABLES = ("item_table",)
FP16_TABLES = ("category_table", "candidate_features")
LOSSY_TABLES = INT8_TABLES + FP16_TABLES
# The dtype's full range, as ExecuTorch's own int8 embedding recipes pass it; the stored values
# are symmetric, in [-127, 127].
QUANT_MIN, QUANT_MAX = -128, 127


def _register_ops() -> None:
    import executorch.exir.passes._quant_patterns_and_replacements  # noqa: F401  (defines embedding_byte)


@torch.no_grad()
def quantize_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [R, D], scales fp16 [R]); an all-zero row stays exactly zero."""
    table = table.detach().to(torch.float32)
    amax = table.abs().amax(dim=1)
    # fp16 scales (2 bytes a row instead of 4), rounded before quantizing so that q * scale is
    # exactly what the program computes.
    scales = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax)).to(torch.float16)
    q = torch.round(table / scales.to(torch.float32).unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


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
        if not torch.compiler.is_exporting():
            # What the runtime's kernel computes: q * scale in fp32, exact (an 8-bit q times an
            # fp16 scale fits fp32's mantissa). The op's eager implementation multiplies in the
            # scales' dtype, fp16, and rounded the golden scores away from the runtime's by up to
            # 9.4e-6 (of the 1e-5 replay tolerance) over 300 demo users.
            return self.weight[rows].to(torch.float32) * self.scales[rows].to(torch.float32).unsqueeze(-1)
        return torch.ops.quantized_decomposed.embedding_byte.dtype(
            self.weight, self.scales, None, QUANT_MIN, QUANT_MAX, rows, dtype=torch.float32)


class Fp16Rows(nn.Module):
    """An fp16 table that reads like the fp32 buffer it replaces: `table[rows]` (fp32 rows)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", table.detach().to(torch.float16).contiguous())

    @property
    def shape(self) -> torch.Size:
        return self.weight.shape

    def __getitem__(self, rows: torch.Tensor) -> torch.Tensor:
        return self.weight[rows].to(torch.float32)


def quantize_program(program: nn.Module, int8_tables: tuple[str, ...] = INT8_TABLES,
                     fp16_tables: tuple[str, ...] = FP16_TABLES) -> nn.Module:
    """Replace the fp32 per-user tables of a `UserProgram` by `Int8Rows` / `Fp16Rows`, in place."""
    for name in int8_tables + fp16_tables:
        table = program._buffers.pop(name, None)
        if table is None:
            raise ValueError(f"{type(program).__name__} has no fp32 buffer {name!r} to quantize")
        setattr(program, name, Int8Rows(table) if name in int8_tables else Fp16Rows(table))
    return program


def quantize_constants(constants: dict[str, torch.Tensor], int8_tables: tuple[str, ...] = INT8_TABLES,
                       fp16_tables: tuple[str, ...] = FP16_TABLES) -> dict[str, torch.Tensor]:
    """The lossy program's per-user constants from the fp32 ones, by state-dict name
    (`item_table` -> `item_table.weight` int8 + `item_table.scales` fp16, `category_table` ->
    `category_table.weight` fp16); others unchanged."""
    out = {}
    for name, value in constants.items():
        if name in int8_tables:
            out[f"{name}.weight"], out[f"{name}.scales"] = quantize_rows(value)
        elif name in fp16_tables:
            out[f"{name}.weight"] = value.detach().to(torch.float16).contiguous()
        else:
            out[name] = value
    return out


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


def int8_program(model: nn.Module, constants: dict[str, torch.Tensor]) -> nn.Module:
    """The eager int8 program of one user from its fp32 constants (`program.slice_constants`)."""
    return store_linear_weights_fp16(quantize_program(UserProgram(model, constants))).eval()


INT8 = register(Recipe("int8", "per-row int8 item table, fp16 other per-user tables and MLP weights + XNNPACK, "
                               "checked against an accuracy budget",
                       partitioners=fp16_weight_partitioners, edge_passes=fp16_weight_passes, program=int8_program,
                       stored_constants=quantize_constants, quantized_tables=LOSSY_TABLES, fallback="xnnpack"))
