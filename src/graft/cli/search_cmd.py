"""``graft search RECIPE --data VAL --param lambda=0.1:1.5:0.1``: choose a recipe's
parameters on held-out data, merging each candidate in memory."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

from graft.cli._data_opts import (
    BatchSizeOpt,
    JsonOpt,
    LabelColumnOpt,
    LimitOpt,
    MaxLengthOpt,
    PairColumnOpt,
    PoolingOpt,
    QuietOpt,
    TextColumnOpt,
    ZooOpt,
    data_options,
)
from graft.cli._progress import count_progress
from graft.cli._safe import echo_json, safe
from graft.io._atomic import check_output
from graft.recipe import RecipeError, load_recipe


def search(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (mergekit's format).")],
    param: Annotated[
        list[str],
        typer.Option(
            "--param",
            help="A parameter to search: name=start:stop:step (stop included) or "
            "name=v1,v2,... Repeat for a grid over several.",
        ),
    ],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="Held-out labelled data: one set, or one per model in recipe order "
            "(each scored with that model's head). Never the test split.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the best recipe here.")],
    head: Annotated[
        list[Path] | None,
        typer.Option("--head", help="Head(s): none, one, or one per --data (see graft eval)."),
    ] = None,
    zoo: ZooOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of zoo tasks.")] = "val",
    threads: Annotated[int, typer.Option("--threads", min=0, help="Merge threads (0 = auto).")] = 0,
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    batch_size: BatchSizeOpt = 32,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    sampler: Annotated[
        str,
        typer.Option(
            "--sampler",
            help="grid (every candidate), random (--trials of them) or tpe (Optuna's "
            "Bayesian TPE, --trials proposals; needs graft[search]).",
        ),
    ] = "grid",
    trials: Annotated[
        int | None, typer.Option("--trials", min=1, help="Candidates for random / tpe.")
    ] = None,
    sampler_seed: Annotated[
        int, typer.Option("--sampler-seed", help="Seed of the random / tpe sampler.")
    ] = 0,
    ray: Annotated[
        str | None,
        typer.Option(
            "--ray",
            help="Evaluate candidates as parallel Ray trials: auto (the cluster running "
            "here), local (start one here) or its address. Models and --data must be on "
            "storage every node sees. Needs graft[ray]; see docs/scale-out.md.",
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option("--workers", min=0, help="With --ray: trials at once (0 = CPUs).")
    ] = 0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Choose recipe parameters on held-out data, merging each candidate in memory.

    Merges RECIPE once per candidate of the --param grid, scores each candidate's mean
    accuracy on the held-out --data, print the table and write the best recipe to OUT.

    A searched parameter is set globally and removed from every model and slice, so the
    candidate value applies everywhere. Candidates are merged by the same engine as
    `graft merge`, in memory (streamed to a scratch folder and memory-mapped when they do
    not fit); nothing is written but OUT. --sampler random / tpe try --trials candidates
    instead of the whole grid; --ray runs them as parallel trials on a Ray cluster.
    """
    from graft.eval.candidates import CandidateMerger
    from graft.eval.search import parse_param_spec, search_recipe
    from graft.eval.tasks import load_tasks, score
    from graft.eval.trials import SAMPLERS, count

    check_output(out, inputs=[recipe], force=force, kind="file")
    if split not in ("val", "test", "train"):
        raise RecipeError(f"unknown split {split!r}; valid splits: val, test, train")
    grid: dict[str, list] = {}
    for spec in param:
        name, values = parse_param_spec(spec)
        if name in grid:
            raise RecipeError(f"--param {name} given twice; give each parameter once")
        grid[name] = values
    n_candidates = count(grid)
    if n_candidates > 10_000:
        raise RecipeError(f"the grid has {n_candidates} candidates; narrow it to at most 10000")
    if sampler not in SAMPLERS:
        raise RecipeError(f"unknown --sampler {sampler!r}; valid samplers: {', '.join(SAMPLERS)}")
    if sampler != "grid":
        if trials is None:
            raise RecipeError(f"--sampler {sampler} needs --trials N")
        n_candidates = min(trials, n_candidates)
    elif trials is not None:
        raise RecipeError("--trials applies to --sampler random or tpe; the grid tries them all")
    if workers and ray is None:
        raise RecipeError("--workers applies to --ray runs; without --ray candidates run here")
    parsed = load_recipe(recipe)
    models, reference = _recipe_models(parsed)
    inputs = [recipe, *models, *([reference] if reference else []), *(head or [])]
    inputs += [Path(d) for d in data if Path(d).exists()]
    check_output(out, inputs=inputs, force=force, kind="file")
    task_args = dict(
        models=models,
        data=data,
        heads=head or [],
        reference=reference,
        zoo=zoo,
        split=split,
        options=data_options(text_column, text_pair_column, label_column, limit),
        pooling=pooling,
        max_length=max_length,
    )
    tasks = load_tasks(**task_args)  # here too: bad data fails before any trial starts
    merger = CandidateMerger(threads=threads or None, scratch=out.parent.resolve())
    evaluate = None
    if ray is not None:
        from graft.eval.trials import RayTrials

        root = parsed.root.resolve() if parsed.root is not None else None
        evaluate = RayTrials(
            ray,
            _rebase(parsed.text, root, None),
            root,
            functools.partial(_task_scorer, _absolute(task_args), batch_size),
            workers=workers or None,
            threads=threads or None,
        )
    try:
        with count_progress("search", n_candidates, unit="candidates", enabled=not quiet) as hook:
            result = search_recipe(
                parsed.text,
                grid,
                lambda s: score(tasks, s, batch_size=batch_size),
                root=parsed.root,
                merge=merger,
                progress=hook,
                sampler=sampler,
                trials=trials,
                seed=sampler_seed,
                evaluate=evaluate,
            )
    finally:
        merger.close()
        if evaluate is not None:
            evaluate.close()
    text = _rebase(result.recipe, parsed.root, out.parent)
    from graft.io import write_text

    write_text(out, text)
    if as_json:
        doc = {
            "recipe": str(recipe),
            "sampler": sampler,
            "grid": result.grid,
            "candidates": result.rows,
            "best": result.best,
            "out": str(out),
            "tasks": [t.name for t in tasks],
        }
        echo_json(doc)
        return
    _print(result, tasks, out)


def _recipe_models(parsed) -> tuple[list[str], str | None]:
    """The recipe's merged models (resolved paths, base excluded) and its base."""
    from graft.plan.models import resolve_model_path

    base = parsed.base_model
    refs = [m for m in parsed.referenced_models() if m != base]
    paths = [str(resolve_model_path(m, parsed.root)) for m in refs]
    return paths, (str(resolve_model_path(base, parsed.root)) if base is not None else None)


def _task_scorer(task_args: dict, batch_size: int):
    """On a Ray worker: load the validation tasks once; return ``score(state)``."""
    from graft.eval.tasks import load_tasks, score

    tasks = load_tasks(**task_args)
    return lambda state: score(tasks, state, batch_size=batch_size)


def _absolute(task_args: dict) -> dict:
    """The task arguments with local paths absolute, for workers in other directories."""

    def fix(p):
        return str(Path(p).resolve()) if p is not None and Path(p).exists() else p

    out = dict(task_args)
    for key in ("models", "data", "heads"):
        out[key] = [fix(p) for p in task_args[key]]
    out["reference"], out["zoo"] = fix(task_args["reference"]), fix(task_args["zoo"])
    return out


def _rebase(text: str, root: Path | None, out_dir: Path | None) -> str:
    """The recipe with relative model paths rewritten for a file written in ``out_dir``
    (None: for any directory, every relative path that exists made absolute)."""
    if root is None or (out_dir is not None and root.resolve() == out_dir.resolve()):
        return text
    comment = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
    doc = yaml.safe_load(text)

    def fix(value):
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        if out_dir is None and Path(value).exists():  # as graft resolves it: cwd first
            return str(Path(value).resolve())
        if (root / value).exists():
            return str((root / value).resolve())
        return value

    if doc.get("base_model"):
        doc["base_model"] = fix(doc["base_model"])
    for m in doc.get("models") or []:
        m["model"] = fix(m["model"])
    for sl in doc.get("slices") or []:
        for src in sl.get("sources") or []:
            src["model"] = fix(src["model"])
    return comment + yaml.safe_dump(doc, sort_keys=False)


def _print(result, tasks, out: Path) -> None:
    names = list(result.grid)
    table = Table(
        *names,
        "mean acc",
        *[safe(t.name) for t in tasks],
        title="held-out accuracy per candidate",
    )
    for row in result.rows:
        style = "bold" if row is result.best else None
        table.add_row(
            *[str(row["params"][n]) for n in names],
            f"{row['score']:.2%}",
            *[f"{row['per_task'][t.name]:.2%}" for t in tasks],
            style=style,
        )
    console = Console()
    console.print(table)
    best = ", ".join(f"{k}={v}" for k, v in result.best["params"].items())
    console.print(
        f"best: {safe(best)} ({result.best['score']:.2%}); recipe written to {safe(str(out))}"
    )
