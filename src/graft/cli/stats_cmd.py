"""``graft stats fisher|gram MODEL --data FILE -o STATS``: the statistics pass of the
data-aware merges (Fisher merging, RegMean)."""

from __future__ import annotations

from pathlib import Path

import typer

from graft.cli._data_opts import (
    BatchSizeOpt,
    DataOpt,
    HeadOpt,
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
from graft.cli._safe import safe
from graft.eval.stats import FISHER_TARGETS, KINDS, write_stats
from graft.io import check_output
from graft.recipe import RecipeError


def stats(
    kind: str = typer.Argument(..., help="fisher | gram"),
    model: Path = typer.Argument(..., help="Model folder (HF, sentence-transformers, zoo)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
    data: DataOpt = None,
    task: str | None = typer.Option(
        None, "--task", help="Zoo task: shorthand for --data task:NAME (its train split)."
    ),
    head: HeadOpt = None,
    zoo: ZooOpt = None,
    split: str = typer.Option("train", "--split", help="Split of a zoo task."),
    samples: int = typer.Option(256, "--samples", help="Examples used (all when fewer)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the example draw."),
    target: str = typer.Option(
        "label", help="Fisher only: label (empirical Fisher) or expected (model's predictions)."
    ),
    normalize: bool = typer.Option(
        True, help="Fisher only: divide by the model's mean Fisher (one factor per model)."
    ),
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    batch_size: BatchSizeOpt = 32,
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    quiet: QuietOpt = False,
) -> None:
    """Compute per-tensor statistics of MODEL on data for a data-aware merge.

    `fisher` writes the diagonal Fisher of every float tensor the model runs (merge_method:
    fisher; needs a head and labels, or --target expected); `gram` writes XᵀX of every
    linear layer's inputs (merge_method: regmean; labels not needed). Name the file in the
    recipe as each model's `statistics` parameter. Use the model's own training data.
    """
    from graft.data import open_model_data

    if kind not in KINDS:
        raise RecipeError(f"unknown statistic {kind!r}; valid: {', '.join(KINDS)}")
    if target not in FISHER_TARGETS:
        raise RecipeError(f"unknown Fisher target {target!r}; valid: {', '.join(FISHER_TARGETS)}")
    if (data is None) == (task is None):
        raise RecipeError("give the data: --data FILE (or --task NAME for a zoo task), one of them")
    if kind == "gram" and (target != "label" or not normalize):
        option = "--target" if target != "label" else "--no-normalize"
        raise RecipeError(f"{option} applies to fisher statistics; a Gram matrix has neither")
    if samples < 1:
        raise RecipeError(f"--samples must be >= 1, got {samples}")
    if not model.exists():
        raise RecipeError(f"model {model} not found; give a model folder")
    if out.exists() and not force:
        raise RecipeError(f"output {out} exists; pass --force to overwrite or choose another path")
    reads = [model, *(p for p in (head, data, zoo) if p is not None and Path(p).exists())]
    check_output(out, inputs=reads, force=force, kind="file")
    labels = kind == "fisher" and target == "label"
    options = data_options(
        text_column, text_pair_column, label_column, limit, require_labels=labels
    )
    runner, dataset = open_model_data(
        model,
        data if data is not None else f"task:{task}",
        head=head,
        zoo=zoo,
        split=split,
        options=options,
        pooling=pooling,
        max_length=max_length,
        need_head=kind == "fisher",
        use_labels=labels,
    )
    with count_progress(f"{kind} pass", min(samples, len(dataset)), enabled=not quiet) as hook:
        path = write_stats(
            kind,
            runner,
            dataset,
            out,
            n_samples=samples,
            target=target,
            normalize=normalize,
            seed=seed,
            batch_size=batch_size,
            force=force,
            progress=hook,
        )
    typer.echo(
        safe(f"wrote {kind} statistics of {model} on {dataset.name} to {path}", markup=False)
    )
