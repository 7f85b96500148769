"""Held-out grid search of a merge's scale, for task arithmetic, TIES and LiNeS.

Each grid point is merged in memory with graft's own pure method functions (the same
``MethodSpec.fn`` the streaming engine calls, per tensor, with the engine's conventions:
non-float tensors copied from the base, ``layer``/``num_layers`` and per-tensor seeds
supplied), then scored on the **validation** split, averaged over the tasks. The winner
is returned as a recipe, so the final model is written by ``graft merge`` like any other.

What is swept (graft's grids; pass ``grid=`` to change them):

* ``task_arithmetic``: ``lambda`` in 0.05, 0.10, ..., 1.0 (sum form, ``normalize:
  false``; Ilharco et al. pick λ on held-out data in this range). With many tasks the
  best λ is near 1/T, so the grid starts low.
* ``ties``: ``lambda`` in 0.1, 0.2, ..., 1.5 at ``density: 0.2`` (the paper's top-20%),
  mean form (graft's ``normalize: true``), where λ = 1 keeps the agreeing average.
* ``lines``: multi-task LiNeS as in METHODS.md: ``alpha: auto`` and ``beta`` in
  0.0, 0.1, ..., 1.0, inner ``task_arithmetic``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from graft.merge import get_method
from graft.plan import tensor_seed
from graft.plan.arch import split_block_name, stack_depths

State = Mapping[str, torch.Tensor]

SWEPT = {"task_arithmetic": "lambda", "ties": "lambda", "lines": "beta"}
DEFAULT_GRIDS = {
    "task_arithmetic": [round(0.05 * i, 2) for i in range(1, 21)],
    "ties": [round(0.1 * i, 2) for i in range(1, 16)],
    "lines": [round(0.1 * i, 2) for i in range(11)],
}
DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.2},
    "lines": {"alpha": "auto", "method": "task_arithmetic"},
}


@dataclass
class SearchResult:
    """A grid search.

    Attributes:
        method: the merge method.
        param: the swept recipe parameter (``lambda`` or ``beta``).
        params: the fixed recipe parameters.
        table: per grid value, (value, mean held-out accuracy, per-task accuracy).
        best_value / best_score: the winner (the smallest value among equal scores).
        recipe: the winning merge as recipe YAML (empty when no paths were given).
    """

    method: str
    param: str
    params: dict[str, Any]
    table: list[tuple[float, float, dict[str, float]]]
    best_value: float
    best_score: float
    recipe: str = field(default="")


def merge_states(
    method: str,
    base: State | None,
    states: Sequence[State],
    params: Mapping[str, Any],
    *,
    stats: Sequence[State] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts in memory with a registered method's pure function.

    Args:
        method: a registered method name.
        base: the base state (ignored by methods that take none).
        states: the models, in recipe order.
        params: recipe parameters by recipe name; a scalar for a per-model parameter is
            given to every model, a list is taken as per model.
        stats: for data-aware methods, per model its statistics (name -> tensor), as the
            statistics files hold them.
        seed: recipe seed, for random methods.

    Returns:
        The merged state, float tensors in float32.
    """
    spec = get_method(method)
    ref = base if base is not None and spec.base != "none" else states[0]
    kwargs: dict[str, Any] = {}
    for name, value in params.items():
        p = spec.param(name)
        if p is None or (spec.stats and name == "statistics"):
            raise ValueError(f"{method} has no in-memory parameter {name!r}")
        if p.per_model and not isinstance(value, list | tuple):
            value = [value] * len(states)
        kwargs[p.argname] = value
    depths = stack_depths(list(ref))  # LiNeS's L: each stack's own depth
    out = {}
    for name, ref_t in ref.items():
        if not ref_t.is_floating_point():
            out[name] = ref_t.clone()
            continue
        extra: dict[str, Any] = {}
        if spec.uses_layer:
            block = split_block_name(name)
            depth = depths[block.prefix] if block else max(depths.values(), default=1)
            extra.update(layer=block.index if block else None, num_layers=depth)
        if spec.stats:
            extra["stats"] = [
                None if st is None or name not in st else st[name].to(spec.compute_dtype)
                for st in (stats or [None] * len(states))
            ]
        if spec.uses_seed:
            extra["generator"] = torch.Generator().manual_seed(tensor_seed(seed, name))
        tensors = [s[name].to(spec.compute_dtype) for s in states]
        b = None if spec.base == "none" or base is None else base[name].to(spec.compute_dtype)
        out[name] = spec.fn(tensors, b, **kwargs, **extra).float()
    return out


def grid_search(
    method: str,
    base: State,
    finetuned: Mapping[str, State],
    score: Callable[[State], tuple[float, dict[str, float]]],
    *,
    grid: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Sweep ``lambda`` (``beta`` for LiNeS) and keep the best held-out score.

    Args:
        method: ``task_arithmetic``, ``ties`` or ``lines``.
        base: the base state.
        finetuned: task -> fine-tuned state.
        score: merged state -> (mean held-out accuracy, per-task accuracy).
        grid: values to try (default: the module's grids).
        params: fixed parameters, overriding the defaults.
    """
    if method not in SWEPT:
        raise ValueError(f"grid search supports {', '.join(SWEPT)}, got {method!r}")
    swept = SWEPT[method]
    fixed = {**DEFAULT_PARAMS[method], **(params or {})}
    states = list(finetuned.values())
    table = []
    for value in grid or DEFAULT_GRIDS[method]:
        merged = merge_states(method, base, states, {**fixed, swept: value})
        mean, per_task = score(merged)
        table.append((float(value), float(mean), per_task))
    best_value, best_score, _ = max(table, key=lambda row: (row[1], -row[0]))
    return SearchResult(method, swept, fixed, table, best_value, best_score)


def recipe_yaml(result: SearchResult, base_model: str, models: Sequence[str]) -> str:
    """The winning merge as a recipe over the given model paths (recipe order)."""
    shared = {k: v for k, v in result.params.items() if k not in ("weight", "density")}
    shared[result.param] = result.best_value
    per_model = {k: v for k, v in result.params.items() if k in ("weight", "density")}
    recipe = {
        "merge_method": result.method,
        "base_model": str(base_model),
        "parameters": shared,
        "models": [{"model": str(m), "parameters": dict(per_model)} for m in models],
    }
    header = (
        f"# held-out grid search: {result.param} = {result.best_value} "
        f"(mean val accuracy {result.best_score:.4f})\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def search_zoo(
    zoo: Any,
    method: str,
    tasks: Sequence[str] | None = None,
    *,
    grid: Sequence[float] | None = None,
    split: str = "val",
    params: Mapping[str, Any] | None = None,
) -> SearchResult:
    """Grid search over a digits zoo's fine-tunes, scored with each task's head on ``split``."""
    from graft.eval.evaluate import evaluate
    from graft.eval.stats import _as_zoo
    from graft.io import load_state_dict
    from graft.models.digits_net import load_backbone, load_head
    from graft.zoo.tasks import task_data

    zoo = _as_zoo(zoo)
    tasks = list(tasks or zoo.finetuned)
    module, _ = load_backbone(zoo.base)
    base = load_state_dict(zoo.base)
    finetuned = {t: load_state_dict(zoo.finetuned[t]) for t in tasks}
    heads = {t: load_head(zoo.heads[t]) for t in tasks}
    data = {t: task_data(t, split, seed=zoo.seed) for t in tasks}

    def score(state: State) -> tuple[float, dict[str, float]]:
        module.load_state_dict(dict(state))
        accs = {t: float(evaluate(module, heads[t], *data[t])["accuracy"]) for t in tasks}
        return sum(accs.values()) / len(accs), accs

    result = grid_search(method, base, finetuned, score, grid=grid, params=params)
    result.recipe = recipe_yaml(result, str(zoo.base), [str(zoo.finetuned[t]) for t in tasks])
    return result


# --- searching any recipe ----------------------------------------------------------------


@dataclass
class RecipeSearch:
    """A search over recipe parameters.

    Attributes:
        grid: parameter -> the values tried.
        rows: per candidate, ``{"params": {name: value}, "score": mean accuracy,
            "per_task": {task: accuracy}, "seconds": s}``, in grid order.
        best: the winning row (highest score; the first in grid order among equal ones).
        recipe: the winning recipe's YAML.
    """

    grid: dict[str, list]
    rows: list[dict]
    best: dict
    recipe: str


def parse_param_spec(spec: str) -> tuple[str, list]:
    """``name=start:stop:step`` (stop included) or ``name=v1,v2,...`` -> (name, values).

    Raises:
        RecipeError: malformed, an empty or huge range, or a non-positive step.
    """
    from graft.recipe import RecipeError

    name, sep, values = spec.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise RecipeError(f"--param {spec!r}: write name=start:stop:step or name=v1,v2")
    if ":" in values:
        parts = values.split(":")
        try:
            start, stop, step = (float(p) for p in parts) if len(parts) == 3 else (None,) * 3
        except ValueError:
            start = None
        if start is None or not all(map(math.isfinite, (start, stop, step))) or step <= 0:
            raise RecipeError(f"--param {spec!r}: start:stop:step needs three numbers, step > 0")
        count = math.floor((stop - start) / step + 1e-9) + 1
        if count < 1 or count > 10_000:
            raise RecipeError(f"--param {spec!r} gives {max(count, 0)} values; give 1 to 10000")
        return name, [round(start + i * step, 10) for i in range(count)]
    out: list = []
    for v in values.split(","):
        v = v.strip()
        try:
            out.append(int(v) if v.lstrip("+-").isdigit() else float(v))
        except ValueError:
            out.append(v)  # a string setting, e.g. method=ties
    return name, out


def candidate_recipe(text: str, params: Mapping[str, Any]) -> str:
    """The recipe with each parameter set globally and removed from every model, slice and
    slice source (so the searched value applies everywhere)."""
    doc = yaml.safe_load(text)
    shared = dict(doc.get("parameters") or {})
    shared.update(params)
    doc["parameters"] = shared
    for scope in _scopes(doc):
        p = scope.get("parameters")
        if isinstance(p, dict):
            for name in params:
                p.pop(name, None)
    return yaml.safe_dump(doc, sort_keys=False)


def _scopes(doc: dict):
    for m in doc.get("models") or []:
        if isinstance(m, dict):
            yield m
    for sl in doc.get("slices") or []:
        if isinstance(sl, dict):
            yield sl
            for src in sl.get("sources") or []:
                if isinstance(src, dict):
                    yield src


def evaluate_candidate(
    text: str,
    params: Mapping[str, Any],
    score: Callable[[dict[str, torch.Tensor]], tuple[float, dict[str, float]]],
    *,
    root=None,
    merge: Callable,
) -> dict:
    """One trial: plan the candidate recipe, merge it (``merge(plan) -> state``), score it.

    Returns:
        ``{"params", "score", "per_task", "seconds"}``, a row of `RecipeSearch.rows`.
    """
    import time

    from graft.plan import plan_merge
    from graft.recipe import parse_recipe

    start = time.perf_counter()
    plan = plan_merge(parse_recipe(candidate_recipe(text, params), root=root), drop_hint=False)
    try:
        state = merge(plan)
    finally:
        plan.close()
    mean, per_task = score(state)
    del state
    return {
        "params": dict(params),
        "score": mean,
        "per_task": per_task,
        "seconds": time.perf_counter() - start,
    }


def search_recipe(
    text: str,
    grid: Mapping[str, Sequence],
    score: Callable[[dict[str, torch.Tensor]], tuple[float, dict[str, float]]] | None,
    *,
    root=None,
    threads: int | None = None,
    merge: Callable | None = None,
    progress: Callable[[int], None] | None = None,
    sampler: str = "grid",
    trials: int | None = None,
    seed: int = 0,
    evaluate: Callable | None = None,
) -> RecipeSearch:
    """Merge candidates of ``grid`` and score each; the best becomes the recipe.

    Args:
        text: the recipe YAML.
        grid: parameter -> values.
        score: merged state -> (mean accuracy, per task); unused with ``evaluate``.
        root: the recipe's folder (relative model paths).
        threads: engine threads.
        merge: plan -> state (default: `graft.plan.merge_in_memory`).
        progress: called with 1 after each candidate.
        sampler: ``grid`` (the cartesian product, in order), ``random`` or ``tpe``
            (``trials`` candidates; `graft.eval.trials`).
        trials: candidates to try with ``random`` / ``tpe``.
        seed: the sampler's seed.
        evaluate: ``evaluate(params_list, progress) -> rows`` evaluating candidates
            concurrently, with a ``width`` (how many at once), such as
            `graft.eval.trials.RayTrials`; default: one after another here.
    """
    from graft.eval import trials as sampling
    from graft.plan import merge_in_memory

    if evaluate is None:
        merge = merge or (lambda plan: merge_in_memory(plan, threads=threads))

        def evaluate(batch, progress=None):
            rows = []
            for params in batch:
                rows.append(evaluate_candidate(text, params, score, root=root, merge=merge))
                if progress is not None:
                    progress(1)
            return rows

    names = list(grid)
    rows = sampling.run(
        grid, evaluate, sampler=sampler, trials=trials, seed=seed, progress=progress
    )
    best = max(rows, key=lambda r: r["score"])  # max keeps the first of equal scores
    comment = (
        f"# graft search: {', '.join(f'{k}={v}' for k, v in best['params'].items())} "
        f"(mean held-out accuracy {best['score']:.4f} over {len(rows)} candidates)\n"
    )
    return RecipeSearch(
        {n: list(grid[n]) for n in names},
        rows,
        best,
        comment + candidate_recipe(text, best["params"]),
    )
