"""Multi-document recipes, as ``mergekit-multi`` reads them.

A recipe file may hold several YAML documents (``---`` between them). Each is a recipe
with a ``name:``; a later (or earlier) document uses a merge's output by giving its name
as a model (``model: stage1``, also as ``base_model``, a slice source, a tokenizer source
or a token's source). At most one document has no name: it is the final merge. A name
takes precedence over a local folder or hub id of the same spelling, as in mergekit.

`load_recipes` returns the documents in the order they must run (every document after
the ones it uses; otherwise file order) and checks what mergekit checks, as one-line
errors: duplicate names, a second unnamed document, cycles. graft adds: names must be
plain folder names (they become folders), a name cannot carry an ``@revision``, and when
every document is named exactly one of them may be unused by the others (that one is
the final merge, written to OUT).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from graft.io import load_yaml_documents
from graft.recipe._settings import RecipeError, show
from graft.recipe.config import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_NODES,
    Recipe,
    read_recipe_text,
    recipe_from_mapping,
)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MAX_DOCUMENTS = 100


@dataclass(frozen=True)
class RecipeStep:
    """One document of a recipe file, ready to plan once its inputs exist.

    Attributes:
        recipe: the document's recipe (``recipe.name`` is its name, None for the final).
        needs: names of the documents whose outputs it reads, in recipe order.
        final: whether this is the merge written to OUT.
    """

    recipe: Recipe
    needs: tuple[str, ...]
    final: bool

    @property
    def label(self) -> str:
        return self.recipe.name or "final merge"


def load_recipes(path: str | Path) -> list[RecipeStep]:
    """Read a recipe file of one or more documents; see `parse_recipes`.

    Raises:
        RecipeError: as `graft.recipe.load_recipe`, or a multi-document rule is broken.
    """
    p = Path(path)
    return parse_recipes(read_recipe_text(p), root=p.resolve().parent)


def parse_recipes(text: str, *, root: Path | None = None) -> list[RecipeStep]:
    """Parse one or more recipe documents into steps in run order, the final one last.

    Raises:
        RecipeError: one line saying what to change.
    """
    if len(text) > MAX_RECIPE_BYTES:
        raise RecipeError(f"recipe is larger than {MAX_RECIPE_BYTES:,} bytes; is it a recipe?")
    try:
        docs = load_yaml_documents(text, max_nodes=MAX_RECIPE_NODES)
    except ValueError as exc:
        raise RecipeError(f"recipe is not valid YAML: {exc}") from None
    docs = [(raw, source) for raw, source in docs if raw is not None]  # a stray '---'
    if len(docs) <= 1:
        if not docs:  # the one-document error
            return [RecipeStep(recipe_from_mapping(None, text=text, root=root), (), True)]
        return [RecipeStep(recipe_from_mapping(docs[0][0], text=text, root=root), (), True)]
    if len(docs) > MAX_DOCUMENTS:
        raise RecipeError(f"recipe has {len(docs)} documents; at most {MAX_DOCUMENTS} are run")
    recipes: dict[str | None, Recipe] = {}
    for i, (raw, source) in enumerate(docs):
        try:
            recipe = recipe_from_mapping(raw, text=source, root=root)
        except RecipeError as e:
            raise RecipeError(f"document {i + 1}: {e}") from None
        _check_name(recipe.name, i, recipes)
        recipes[recipe.name] = recipe
    needs = {name: _uses(r, recipes) for name, r in recipes.items()}
    order = _run_order(list(recipes), needs)
    final = _final(recipes, needs)
    return [RecipeStep(recipes[n], tuple(needs[n]), n == final) for n in order]


def with_outputs(step: RecipeStep, outputs: dict[str, Path]) -> Recipe:
    """The step's recipe with each document name it uses mapped to that output folder."""
    return replace(step.recipe, aliases={n: outputs[n] for n in step.needs})


def _check_name(name: str | None, i: int, seen: dict) -> None:
    if name is None:
        if None in seen:
            raise RecipeError(
                f"document {i + 1} has no name: but another document has none either; only "
                "the final merge may be unnamed (mergekit-multi refuses this too)"
            )
        return
    if not _NAME.fullmatch(name) or name in (".", ".."):
        raise RecipeError(
            f"document {i + 1}: name {show(name)} must be a plain folder name (letters, digits, "
            "'.', '_', '-'; at most 100 characters): intermediate outputs are stored under it"
        )
    if name in seen:
        raise RecipeError(f"two documents are named {name!r}; give each a different name")


def _uses(recipe: Recipe, recipes: dict[str | None, Recipe]) -> list[str]:
    """The document names ``recipe`` uses as models, in recipe order."""
    used: list[str] = []
    for ref in recipe.named_models():
        if ref.path in recipes:
            if ref.revision:
                raise RecipeError(
                    f"model {ref} names the output of document {ref.path!r}, which has no "
                    f"revisions; write {ref.path} without '@{ref.revision}'"
                )
            if ref.path not in used:
                used.append(ref.path)
    return used


def _run_order(names: list[str | None], needs: dict) -> list[str | None]:
    """Depth-first in file order: each document after the ones it uses."""
    order: list[str | None] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, path: list[str | None]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "open":
            cycle = path[path.index(name) :] + [name]
            shown = " -> ".join(n or "(final merge)" for n in cycle)
            raise RecipeError(
                f"documents depend on each other in a cycle: {shown}; a merge can only use "
                "outputs of other documents"
            )
        state[name] = "open"
        for dep in needs[name]:
            visit(dep, [*path, name])
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, [])
    return order


def _final(recipes: dict[str | None, Recipe], needs: dict) -> str | None:
    if None in recipes:
        return None
    used = {dep for deps in needs.values() for dep in deps}
    sinks = [n for n in recipes if n not in used]
    if len(sinks) != 1:  # several (a cycle would have failed already)
        raise RecipeError(
            f"documents {', '.join(map(str, sinks))} are all unused by the others, so none "
            "is the final merge; remove the name: of the one graft should write to OUT"
        )
    return sinks[0]
