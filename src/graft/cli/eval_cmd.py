"""``graft eval MODEL --task T``: accuracy and loss of a (merged) model on zoo tasks."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft.recipe import RecipeError


def eval_model(
    model: Path = typer.Argument(..., help="Model folder (a zoo checkpoint or a merge of them)."),
    task: list[str] = typer.Option(
        ..., "--task", help="Zoo task to evaluate on; repeat for several, or 'all'."
    ),
    zoo: Path = typer.Option(
        Path("graft-demo/zoo"), help="The zoo folder (built by `graft demo`)."
    ),
    split: str = typer.Option("test", help="Data split: test, val or train."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Evaluate a model on zoo tasks with each task's fine-tuned head; prints accuracy and loss."""
    from graft.eval.evaluate import evaluate_task
    from graft.zoo.build import ZooError, load_zoo

    if split not in ("test", "val", "train"):
        raise RecipeError(f"unknown split {split!r}; valid splits: test, val, train")
    try:
        z = load_zoo(zoo)
    except ZooError as e:
        raise RecipeError(str(e)) from e
    tasks = list(z.heads) if "all" in task else list(dict.fromkeys(task))
    unknown = [t for t in tasks if t not in z.heads]
    if unknown:
        raise RecipeError(
            f"unknown task {unknown[0]!r}; valid tasks: {', '.join(z.heads)} (or 'all')"
        )
    results = {}
    for t in tasks:
        try:
            results[t] = evaluate_task(model, t, z, split=split)
        except ValueError as e:  # not a GraftDigitsNet, or features that do not fit the head
            raise RecipeError(str(e)) from e
    if as_json:
        typer.echo(
            json.dumps(
                {"model": str(model), "zoo": str(zoo), "split": split, "results": results}, indent=2
            )
        )
        return
    table = Table("task", "accuracy", "loss", "n", title=f"{model} ({split} split)")
    for t, r in results.items():
        table.add_row(t, f"{r['accuracy']:.2%}", f"{r['loss']:.4f}", str(r["n"]))
    if len(results) > 1:
        mean = sum(r["accuracy"] for r in results.values()) / len(results)
        table.add_row("mean", f"{mean:.2%}", "", "")
    Console().print(table)
