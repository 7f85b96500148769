"""Merge recipes: mergekit-compatible YAML parsed into small frozen dataclasses."""

from graft.recipe._settings import RecipeError, evaluate_setting
from graft.recipe.config import (
    InputModel,
    ModelRef,
    ModuleRecipe,
    OutputSlice,
    Recipe,
    SliceSource,
    load_recipe,
    parse_recipe,
)
from graft.recipe.multi import RecipeStep, load_recipes, parse_recipes

# (graft.recipe._tokens holds the tokenizer: block's dataclasses.)

__all__ = [
    "InputModel",
    "ModelRef",
    "ModuleRecipe",
    "OutputSlice",
    "Recipe",
    "RecipeError",
    "RecipeStep",
    "SliceSource",
    "evaluate_setting",
    "load_recipe",
    "load_recipes",
    "parse_recipe",
    "parse_recipes",
]
