"""Recipes: name -> `Recipe` (how a user's program is built, stored and lowered; `recipes/base.py`).

This module imports no torch, so the CLI can list the recipes cheaply: a recipe's module is imported
(and registers its `Recipe`) the first time `get_recipe` asks for it. Adding a recipe touches only
this folder: a module that calls `register(Recipe(...))`, and its line in `RECIPE_MODULES`.
"""

from __future__ import annotations

import importlib

RECIPE_MODULES: dict[str, str] = {
    "xnnpack": "sdk_builder.recipes.fp32",
    "portable": "sdk_builder.recipes.fp32",
    "int8": "sdk_builder.recipes.int8",
    "fp16": "sdk_builder.recipes.fp16",
}
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPE_MODULES)
RECIPES: dict = {}  # name -> Recipe, filled by `recipes.base.register` as the modules are imported
DEFAULT_RECIPE = "xnnpack"
# Lossy recipes: the default max |score drift| vs the fp32 model, and what to do beyond it
# (refuse the bundle, or build it with the recipe's fallback); applied by sdk_builder/bundle/budget.py.
DEFAULT_ACCURACY_BUDGET = 0.01
ON_BUDGET_EXCEEDED = ("fail", "fp32")


def get_recipe(recipe):
    """The registered `Recipe` of a name (a `Recipe` is returned as it is)."""
    if not isinstance(recipe, str):
        return recipe
    if recipe not in RECIPE_MODULES:
        raise ValueError(f"unknown recipe {recipe!r}; expected one of {RECIPE_NAMES}")
    importlib.import_module(RECIPE_MODULES[recipe])
    return RECIPES[recipe]


__all__ = ["DEFAULT_ACCURACY_BUDGET", "DEFAULT_RECIPE", "ON_BUDGET_EXCEEDED", "RECIPE_MODULES", "RECIPE_NAMES", "RECIPES",
           "get_recipe"]
