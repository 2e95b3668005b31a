"""Export once per checkpoint, stamp per user: one `ProgramTemplate` for every recipe.

All users' programs share one graph and one set of tensor shapes (a fixed `SliceLayout`); only the
per-user constants differ. The template is exported with a distinct random pattern in each
per-user constant, the pattern is found in the serialized program (exactly once, or we refuse),
and a user's program is the template's bytes with that user's constants written over the
patterns. A recipe says how the constants are stored (`Recipe.stored_constants`: fp32 as they
are, int8 as quantized rows plus scales). `check_against_export` guards the shortcut: stamped and
fully exported programs of the same users must give the same outputs in the ExecuTorch runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.tbsm import TBSM
from sdk_builder.program import USER_CONSTANTS, Shard, SliceLayout, slice_constants, user_state
from sdk_builder.recipes import get_recipe
from sdk_builder.recipes.base import Recipe
from sdk_builder.runtime import load_runtime_method

SENTINEL_SEED = 0x7B5_5EED


class StampingError(RuntimeError):
    pass


@dataclass(frozen=True)
class ProgramTemplate:
    program: bytes
    offsets: dict[str, int]  # byte offset of each stored per-user constant in `program`
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # stored constant name -> numpy dtype name
    layout: SliceLayout
    recipe: str

    def stamp(self, constants: dict[str, torch.Tensor]) -> bytes:
        """The program of one user from its fp32 constants (`slice_constants`)."""
        stored = get_recipe(self.recipe).stored_constants(constants)
        out = bytearray(self.program)
        for name, offset in self.offsets.items():
            array = stored[name].detach().contiguous().numpy()
            if tuple(array.shape) != self.shapes[name] or str(array.dtype) != self.dtypes[name]:
                raise StampingError(f"constant {name}: shape {tuple(array.shape)} / {array.dtype} does not fit the "
                                    f"template {self.shapes[name]} / {self.dtypes[name]}")
            raw = array.tobytes()
            out[offset : offset + len(raw)] = raw
        return bytes(out)

    def stamped_from_this(self, program: bytes) -> bool:
        """Whether `program` is this template stamped with some user's constants: every byte outside
        the per-user constants equal."""
        if len(program) != len(self.program):
            return False
        shared = np.frombuffer(self.program, np.uint8) == np.frombuffer(program, np.uint8)
        for name, offset in self.offsets.items():
            shared[offset : offset + int(np.prod(self.shapes[name])) * np.dtype(self.dtypes[name]).itemsize] = True
        return bool(shared.all())

    def constant(self, program: bytes, name: str) -> np.ndarray:
        """A stored per-user constant of a program stamped from this template (read-only view)."""
        dtype, shape = np.dtype(self.dtypes[name]), self.shapes[name]
        return np.frombuffer(program, dtype, count=int(np.prod(shape)), offset=self.offsets[name]).reshape(shape)


def build_template(model: TBSM, layout: SliceLayout, recipe: str | Recipe, example: Shard,
                   item_category: np.ndarray) -> ProgramTemplate:
    recipe = get_recipe(recipe)
    sentinels = sentinel_constants(slice_constants(model, example, item_category, layout))
    program = recipe.compile(model, sentinels)
    stored = recipe.stored_constants({name: sentinels[name] for name in USER_CONSTANTS})
    offsets, stored_shapes, dtypes = {}, {}, {}
    for name, tensor in stored.items():
        array = tensor.detach().contiguous().numpy()
        offsets[name] = offset_once(program, array.tobytes(), name, recipe.name)
        stored_shapes[name], dtypes[name] = tuple(array.shape), str(array.dtype)
    return ProgramTemplate(program, offsets, stored_shapes, dtypes, layout, recipe.name)


def sentinel_constants(constants: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The distinct random pattern a template is exported with, in place of each per-user constant
    (of the constants' shapes and dtypes: floats, or integer rows of any value the dtype holds up to 2**15)."""
    rng = np.random.default_rng(SENTINEL_SEED)
    out = {}
    for name, t in constants.items():
        shape = tuple(t.shape)
        out[name] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32) if t.dtype.is_floating_point
                                     else rng.integers(0, 1 << 15, shape).astype(t.numpy().dtype))
    return out


def check_sentinels(template: ProgramTemplate, constants: dict[str, torch.Tensor]) -> None:
    """A template read back (e.g. from a cache) must hold the sentinel pattern at every recorded offset,
    for constants of these shapes: an offset off by a byte, or a template of other shapes or another
    recipe, is refused (StampingError) rather than stamped into a subtly wrong program."""
    sentinels = sentinel_constants(constants)
    stored = get_recipe(template.recipe).stored_constants({name: sentinels[name] for name in USER_CONSTANTS})
    if set(stored) != set(template.offsets):
        raise StampingError(f"template constants {sorted(template.offsets)} differ from the recipe's {sorted(stored)}")
    for name, tensor in stored.items():
        raw = tensor.detach().contiguous().numpy().tobytes()
        offset = template.offsets[name]
        if template.program[offset : offset + len(raw)] != raw:
            raise StampingError(f"template constant {name}: no sentinel pattern at its offset {offset}")


def offset_once(program: bytes, raw: bytes, name: str, recipe: str) -> int:
    """Where a constant's bytes sit in the program; refuses unless they occur exactly once
    (not stored verbatim, e.g. packed into a delegate blob, or ambiguous: stamping would be unsafe)."""
    first = program.find(raw)
    if first < 0 or program.find(raw, first + 1) >= 0:
        raise StampingError(f"per-user constant {name} is not stored verbatim exactly once in the {recipe} program")
    return first


def check_against_export(template: ProgramTemplate, model: TBSM, shards: list[Shard], item_category: np.ndarray,
                         requests: list[list[torch.Tensor]]) -> float:
    """Max abs difference between stamped and fully exported programs over `requests` (the six request
    inputs; each shard's user state is appended); raises on any."""
    recipe = get_recipe(template.recipe)
    worst = 0.0
    for shard in shards:
        constants = slice_constants(model, shard, item_category, template.layout)
        stamped = load_runtime_method(template.stamp(constants))
        exported = load_runtime_method(recipe.compile(model, constants))
        state = user_state(model, shard.user_row)
        for request in requests:
            request = [*request[:6], state]
            a = stamped.execute(request)[0]
            b = exported.execute(request)[0]
            worst = max(worst, float((a - b).abs().max()))
    if worst > 1e-6:
        raise StampingError(f"stamped programs differ from fully exported ones by {worst:.2e}; refusing to stamp")
    return worst
