"""Which candidates a search tries, and where they run.

Samplers (``graft search --sampler``):

* ``grid``: every point of the cartesian product, in order.
* ``random``: ``trials`` distinct grid points drawn uniformly without replacement
  (``random.Random(seed)``), in the order drawn.
* ``tpe``: Optuna's Tree-structured Parzen Estimator (Bayesian; Bergstra et al. 2011) over
  the grid's values, ``trials`` proposals. Ordered numeric values are searched as an
  ordered index (so TPE models "near"), other values as categories; proposals come in
  batches as wide as the evaluator (``constant_liar`` keeps a batch from piling onto one
  point) and a point proposed again is not re-merged. Needs ``graft[search]`` (optuna).

Evaluators run a batch of candidates: here one after another
(`graft.eval.search.search_recipe`'s default), or as parallel Ray trials (`RayTrials`),
each trial merging in memory on a worker and scoring on the validation data there.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from graft.recipe import RecipeError

SAMPLERS = ("grid", "random", "tpe")

Evaluate = Callable[..., list[dict]]  # (params_list, progress) -> rows


def count(grid: Mapping[str, Sequence]) -> int:
    """Points in the grid's cartesian product."""
    n = 1
    for values in grid.values():
        n *= len(values)
    return n


def run(
    grid: Mapping[str, Sequence],
    evaluate: Evaluate,
    *,
    sampler: str = "grid",
    trials: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[dict]:
    """Evaluate the candidates ``sampler`` chooses from ``grid``; the rows, in trial order.

    Raises:
        RecipeError: an unknown sampler, or ``random``/``tpe`` without ``trials`` >= 1.
    """
    if sampler not in SAMPLERS:
        raise RecipeError(f"unknown --sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    names = list(grid)
    points = [dict(zip(names, v, strict=True)) for v in itertools.product(*grid.values())]
    if sampler == "grid":
        return evaluate(points, progress)
    if not trials or trials < 1:
        raise RecipeError(f"--sampler {sampler} needs --trials N (N >= 1)")
    if sampler == "random":
        return evaluate(random.Random(seed).sample(points, min(trials, len(points))), progress)
    return _tpe(grid, evaluate, trials=min(trials, len(points)), seed=seed, progress=progress)


def _tpe(grid, evaluate: Evaluate, *, trials: int, seed: int, progress) -> list[dict]:
    try:
        import optuna
    except ImportError:
        raise RecipeError(
            "--sampler tpe needs Optuna, which is not installed; pip install 'graft[search]'"
        ) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(
        seed=seed, constant_liar=True, n_startup_trials=max(1, min(10, trials // 2))
    )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    width = max(1, getattr(evaluate, "width", 1))
    seen: dict[tuple, dict] = {}
    rows: list[dict] = []
    asked = 0
    while asked < trials and len(seen) < count(grid):
        batch = [study.ask() for _ in range(min(width, trials - asked))]
        asked += len(batch)
        proposals = [_suggest(t, grid) for t in batch]
        fresh = list({_key(p): p for p in proposals if _key(p) not in seen}.values())
        for row in evaluate(fresh, progress):
            seen[_key(row["params"])] = row
            rows.append(row)
        for t, p in zip(batch, proposals, strict=True):
            study.tell(t, seen[_key(p)]["score"])
    return rows


def _suggest(trial, grid: Mapping[str, Sequence]) -> dict[str, Any]:
    out = {}
    for name, values in grid.items():
        values = list(values)
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and values == sorted(values):
            out[name] = values[trial.suggest_int(name, 0, len(values) - 1)]
        else:
            out[name] = values[trial.suggest_categorical(name, list(range(len(values))))]
    return out


def _key(params: Mapping[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


class _Trial:
    """A Ray actor: loads the validation tasks once, then merges and scores candidates."""

    def __init__(self, text: str, root, make_score: Callable, threads: int | None) -> None:
        from graft.eval.candidates import CandidateMerger

        self.text, self.root = text, root
        self.score = make_score()
        self.merge = CandidateMerger(threads=threads)

    def run(self, params: dict) -> dict:
        from graft.eval.search import evaluate_candidate

        return evaluate_candidate(self.text, params, self.score, root=self.root, merge=self.merge)


class RayTrials:
    """An evaluator running candidates as parallel Ray trials, one actor per worker.

    Args:
        address: the cluster (`graft._ray.connect`).
        text: the recipe YAML, its model paths absolute (workers have other directories).
        root: the recipe's folder, absolute.
        make_score: a picklable zero-argument callable, run once on each worker, returning
            ``score(state) -> (mean accuracy, per task)`` on data every node can read.
        workers: trials at once (default: the cluster's CPUs).
        threads: engine threads per trial.
    """

    def __init__(
        self,
        address: str,
        text: str,
        root,
        make_score: Callable,
        *,
        workers: int | None = None,
        threads: int | None = None,
    ):
        from graft._ray import connect

        self.ray = ray = connect(address)
        self.width = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        actor = ray.remote(num_cpus=1, max_restarts=1, max_task_retries=1)(_Trial)
        self.actors = [actor.remote(text, root, make_score, threads) for _ in range(self.width)]

    def __call__(self, batch: Sequence[dict], progress=None) -> list[dict]:
        from ray.util import ActorPool

        from graft._ray import RayError

        rows = []
        try:
            for row in ActorPool(self.actors).map(lambda a, p: a.run.remote(p), list(batch)):
                rows.append(row)
                if progress is not None:
                    progress(1)
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None
        except self.ray.exceptions.RayError as e:
            raise RayError(
                f"Ray lost a search trial ({type(e).__name__}: a worker or node died) after "
                "a retry; rerun when the cluster is healthy"
            ) from None
        return rows

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []
