"""``graft stats KIND MODEL``: the statistics pass of data-aware merges (Fisher, RegMean)."""

from __future__ import annotations

from pathlib import Path

import typer

from graft.eval.stats import KINDS, write_stats
from graft.recipe import RecipeError


def stats(
    kind: str = typer.Argument(..., help="fisher | gram"),
    model: Path = typer.Argument(..., help="Backbone model folder (a zoo fine-tune or merge)."),
    task: str = typer.Option(..., help="Task whose training data (and head) to use."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    zoo: Path = typer.Option(Path("graft-demo/zoo"), help="Zoo folder (heads, data seed)."),
    samples: int = typer.Option(256, help="Training examples used (all when fewer)."),
    target: str = typer.Option(
        "label", help="Fisher only: label (empirical Fisher) or expected (model's predictions)."
    ),
    normalize: bool = typer.Option(
        True, help="Fisher only: divide by the model's mean Fisher (one factor per model)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
) -> None:
    """Compute per-tensor statistics of MODEL on TASK's data for a data-aware merge.

    `fisher` writes the diagonal Fisher of every backbone tensor (merge_method: fisher);
    `gram` writes XᵀX of every linear layer's inputs (merge_method: regmean). Name the
    file in the recipe as each model's `statistics` parameter.
    """
    if kind not in KINDS:
        raise RecipeError(f"unknown statistic {kind!r}; valid: {', '.join(KINDS)}")
    if not model.exists():
        raise RecipeError(f"model {model} not found; give a backbone model folder")
    if out.exists() and not force:
        raise RecipeError(f"output {out} exists; pass --force to overwrite or choose another path")
    try:
        path = write_stats(
            kind, model, task, out, zoo, samples, target=target, normalize=normalize, force=force
        )
    except ValueError as exc:  # not a zoo model (load_backbone), bad zoo
        if isinstance(exc, RecipeError):
            raise
        raise RecipeError(str(exc)) from None
    typer.echo(f"wrote {kind} statistics of {model} on {task} to {path}")
