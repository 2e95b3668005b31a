"""Recipes: name -> `Recipe` (how a user's program is built, stored and lowered).

Adding a recipe touches only this folder: a module that calls `register(Recipe(...))`, imported below.
"""

from sdk_builder.recipes.base import (
    DEFAULT_ACCURACY_BUDGET, DEFAULT_RECIPE, ON_BUDGET_EXCEEDED, RECIPES, Recipe, compile_program, get_recipe, register,
)
from sdk_builder.recipes import fp32, int8  # noqa: F401,E402  (register the recipes)

RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)

__all__ = ["DEFAULT_ACCURACY_BUDGET", "DEFAULT_RECIPE", "ON_BUDGET_EXCEEDED", "RECIPES", "RECIPE_NAMES", "Recipe", "compile_program", "get_recipe", "register"]
