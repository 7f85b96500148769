"""``graft pleas A B [C ...] --data FILE -o OUT``: PLeaS (Nasery et al. 2025) — merge
models trained from different initialisations: match their units by permutation, then
solve each layer by least squares on the data (`graft.merge.pleas`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from graft.cli._data_opts import (
    BatchSizeOpt,
    JsonOpt,
    LimitOpt,
    MaxLengthOpt,
    PairColumnOpt,
    QuietOpt,
    TextColumnOpt,
    ZooOpt,
    data_options,
)
from graft.cli._progress import count_progress
from graft.cli._safe import echo_json, safe


def pleas(
    models: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more models; the first one's basis is the merged model's, every "
            "other one is permuted into it.",
            show_default=False,
        ),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Inputs every model runs on (labels are not read): .csv/.jsonl (text "
            "column), .npz, image folder, or task:NAME.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The merged model folder to write.")],
    match: Annotated[
        str,
        typer.Option("--match", help="How units are matched: activation (on --data) or weight."),
    ] = "activation",
    ratio: Annotated[
        float,
        typer.Option(
            "--ratio",
            help="Fraction of each MLP/FFN layer's units merged; the rest are kept from "
            "every model, widening intermediate_size (1 merges all).",
        ),
    ] = 1.0,
    weight: Annotated[
        float | None,
        typer.Option(
            "--weight", help="Two models: the first one's share (the second gets 1 − it)."
        ),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights",
            help="Each model's share, comma-separated in the models' order (normalised to "
            "sum 1); default equal.",
        ),
    ] = None,
    ridge: Annotated[
        float,
        typer.Option(
            "--ridge", help="Ridge of the least squares, relative to the inputs' mean square."
        ),
    ] = 1e-4,
    no_least_squares: Annotated[
        bool,
        typer.Option(
            "--no-least-squares", help="Only permute and average (the Git Re-Basin baseline)."
        ),
    ] = False,
    zoo: ZooOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of a zoo task.")] = "train",
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    batch_size: BatchSizeOpt = 64,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if graft wrote it.")] = False,
    force_any: Annotated[
        bool, typer.Option("--force-overwrite-anything", help="Replace OUT whatever it is.")
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """PLeaS: merge models from different initialisations (permute, then least squares).

    Supports GraftDigitsNet and BERT encoders (MiniLM). Heads (head.safetensors) of every
    model are merged too. OUT is a model folder transformers / graft loads.
    """
    from graft.data import DataError
    from graft.merge._pleas_run import run_pleas

    if split not in ("test", "val", "train"):
        from graft.recipe import RecipeError

        raise RecipeError(f"unknown --split {split!r}; valid: train, val, test")

    def bar(total: int):
        return count_progress("PLeaS", total, unit="steps", enabled=not (quiet or as_json))

    if weight is not None and weights is not None:
        raise DataError("give --weight (two models) or --weights (one share per model), not both")
    shares = None
    if weight is not None:
        if len(models) != 2 or not 0 <= weight <= 1:
            raise DataError(
                f"--weight is the first model's share in [0, 1] for two models (got {weight} "
                f"for {len(models)}); use --weights W1,W2,... for more"
            )
        shares = [weight, 1 - weight]
    elif weights is not None:
        try:
            shares = [float(w) for w in weights.split(",")]
        except ValueError:
            raise DataError(
                f"--weights takes numbers separated by commas, got {weights!r}"
            ) from None
    report = run_pleas(
        models,
        data,
        out,
        match=match,
        ratio=ratio,
        weights=shares,
        ridge=ridge,
        solve=not no_least_squares,
        options=data_options(text_column, text_pair_column, "label", limit, require_labels=False),
        zoo=zoo,
        split=split,
        batch_size=batch_size,
        max_length=max_length,
        force=force or force_any,
        overwrite_anything=force_any,
        progress_bar=bar,
    )
    doc = {
        "out": str(report.out),
        "architecture": report.architecture,
        "match": report.match,
        "ratio": report.ratio,
        "examples": report.examples,
        "widths": report.widths,
        "fit_error": report.errors,
        "head": report.head,
        "seconds": report.seconds,
        "warnings": report.warnings,
    }
    if as_json:
        echo_json(doc)
        return
    for w in report.warnings:
        Console(stderr=True).print(f"warning: {safe(w)}")
    worst = max(report.errors.values(), default=0.0)
    width = f", widths {report.widths}" if report.widths else ""
    Console().print(
        f"PLeaS ({report.match} matching, ratio {report.ratio:g}) of "
        f"{safe(', '.join(str(m) for m in models))} on {report.examples} examples into "
        f"{safe(str(report.out))}"
        f"{safe(width)}; worst layer fit 1 − R² = {worst:.3f}"
        + (", head merged" if report.head else "")
    )
