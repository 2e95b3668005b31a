"""Export once per checkpoint, stamp per user.

All users' programs share one graph and one set of tensor shapes (a fixed `SliceLayout`); only the
per-user constants differ. The template is exported with a distinct random pattern in each
per-user constant, the pattern is found in the serialized program (exactly once, or we refuse),
and a user's program is the template's bytes with that user's constants written over the
patterns. `check_against_export` guards the shortcut: stamped and fully exported programs of the
same users must give the same outputs in the ExecuTorch runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from model.tbsm import TBSM
from sdk_builder.export import (
    USER_CONSTANTS, Shard, SliceLayout, UserProgram, export_program, load_runtime_method, lower, slice_constants,
)

_SENTINEL_SEED = 0x7B5_5EED


class StampingError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProgramTemplate:
    program: bytes
    offsets: dict[str, int]  # byte offset of each per-user constant in `program`
    shapes: dict[str, tuple[int, ...]]
    layout: SliceLayout
    recipe: str

    def stamp(self, constants: dict[str, torch.Tensor]) -> bytes:
        out = bytearray(self.program)
        for name, offset in self.offsets.items():
            tensor = constants[name]
            if tuple(tensor.shape) != self.shapes[name] or tensor.dtype != torch.float32:
                raise StampingError(f"constant {name}: shape {tuple(tensor.shape)} / {tensor.dtype} does not fit the template {self.shapes[name]}")
            raw = tensor.detach().contiguous().numpy().tobytes()
            out[offset : offset + len(raw)] = raw
        return bytes(out)


def build_template(model: TBSM, layout: SliceLayout, recipe: str, example: Shard, item_category: np.ndarray) -> ProgramTemplate:
    shapes = {name: tuple(t.shape) for name, t in slice_constants(model, example, item_category, layout).items()}
    rng = np.random.default_rng(_SENTINEL_SEED)
    sentinels = {name: torch.from_numpy(rng.standard_normal(shape).astype(np.float32)) for name, shape in shapes.items()}
    program = bytes(lower(export_program(UserProgram(model, sentinels)), recipe).buffer)
    offsets = {name: offset_once(program, sentinels[name].numpy().tobytes(), name, recipe) for name in USER_CONSTANTS}
    return ProgramTemplate(program, offsets, shapes, layout, recipe)


def offset_once(program: bytes, raw: bytes, name: str, recipe: str) -> int:
    """Where a constant's bytes sit in the program; refuses unless they occur exactly once
    (not stored verbatim, e.g. packed into a delegate blob, or ambiguous: stamping would be unsafe)."""
    first = program.find(raw)
    if first < 0 or program.find(raw, first + 1) >= 0:
        raise StampingError(f"per-user constant {name} is not stored verbatim exactly once in the {recipe} program")
    return first


def check_against_export(template: ProgramTemplate, model: TBSM, shards: list[Shard], item_category: np.ndarray,
                         requests: list[list[torch.Tensor]],
                         make_program: Callable[[TBSM, dict[str, torch.Tensor]], torch.nn.Module] = UserProgram) -> float:
    """Max abs difference between stamped and fully exported programs over `requests`; raises on any."""
    worst = 0.0
    for shard in shards:
        constants = slice_constants(model, shard, item_category, template.layout)
        stamped = load_runtime_method(template.stamp(constants))
        exported = load_runtime_method(bytes(lower(export_program(make_program(model, constants)), template.recipe).buffer))
        for request in requests:
            a = stamped.execute(request)[0]
            b = exported.execute(request)[0]
            worst = max(worst, float((a - b).abs().max()))
    if worst > 1e-6:
        raise StampingError(f"stamped programs differ from fully exported ones by {worst:.2e}; refusing to stamp")
    return worst
