"""Merge recipes: mergekit-compatible YAML parsed into small frozen dataclasses."""

from graft.recipe._settings import RecipeError, evaluate_setting
from graft.recipe.config import (
    InputModel,
    ModelRef,
    OutputSlice,
    Recipe,
    SliceSource,
    load_recipe,
    parse_recipe,
)

__all__ = [
    "InputModel",
    "ModelRef",
    "OutputSlice",
    "Recipe",
    "RecipeError",
    "SliceSource",
    "evaluate_setting",
    "load_recipe",
    "parse_recipe",
]
