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

Shared MLP weights: stored in fp16 inside the XNNPACK delegate and computed in fp32, as in the
`fp16` recipe (`sdk_builder/recipes/fp16_weights.py`).

Not lossy: the user state (a program input, ~30 floats), the biases and the constant matrices
used through `F.linear` outside an `nn.Linear` (the heads' `A`, the ones rows of the products).

The program's inputs and outputs are those of the fp32 recipes: the contract does not depend on
the recipe. `quantize_program` swaps the tables of a `UserProgram` for `Int8Rows` / `Fp16Rows`
modules, which support the same `table[rows]` indexing the program already uses, so `forward` is
unchanged. The build-time accuracy budget is `sdk_builder/bundle/budget.py`; stamping is
`sdk_builder/stamp.py`.
"""

from __future__ import annotations

import torch
from torch import nn

from sdk_builder.program import UserProgram
from sdk_builder.recipes.base import Recipe, register
from sdk_builder.recipes.fp16_weights import fp16_weight_partitioners, fp16_weight_passes, store_linear_weights_fp16

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


def int8_program(model: nn.Module, constants: dict[str, torch.Tensor]) -> nn.Module:
    """The eager int8 program of one user from its fp32 constants (`program.slice_constants`)."""
    return store_linear_weights_fp16(quantize_program(UserProgram(model, constants))).eval()


INT8 = register(Recipe("int8", "per-row int8 item table, fp16 other per-user tables and MLP weights + XNNPACK, "
                               "checked against an accuracy budget",
                       partitioners=fp16_weight_partitioners, edge_passes=fp16_weight_passes, program=int8_program,
                       stored_constants=quantize_constants, quantized_tables=LOSSY_TABLES, fallback="xnnpack"))
