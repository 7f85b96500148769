"""``graft rank --data DATA --models PATHS | --db FILE``: which model to start from, by
transferability scores on frozen features (no fine-tuning)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from graft.cli._data_opts import (
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
from graft.recipe import RecipeError


def rank(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Labelled data: .csv/.tsv/.jsonl (text + label columns), .npz, an image "
            "folder, a .safetensors of inputs and labels, or task:NAME (a zoo task).",
        ),
    ],
    models: Annotated[
        list[str] | None,
        typer.Option("--models", help="Model folders (repeat, or comma-separated)."),
    ] = None,
    db: Annotated[
        Path | None,
        typer.Option("--db", help="Rank every model in this zoo index that graft can load."),
    ] = None,
    scores: Annotated[
        str, typer.Option("--scores", help="Comma-separated scores.")
    ] = "logme,leep,nce,hscore,knn,linear",
    sort: Annotated[
        str | None,
        typer.Option(
            "--sort", help="Score to sort by (default: logme if requested, else the first)."
        ),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="Split of a zoo task.")] = "train",
    zoo: ZooOpt = None,
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Examples per forward pass.")
    ] = 256,
    threads: Annotated[
        int | None,
        typer.Option("--threads", min=1, help="CPU threads for forward passes (default: torch's)."),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Rank models for a labelled data set by LogME, LEEP, NCE, H-score, kNN and linear probe.

    Features are each model's pooled last hidden state (--pooling, mean by default); LEEP
    and NCE use the model's own classifier (its source head) and are skipped, with a note,
    for models without one.
    """
    from graft.find import DEFAULT_SCORE, RankError, load_data, rank_models

    names = [s.strip() for s in scores.split(",") if s.strip()]
    if not names:
        raise RecipeError("--scores is empty; e.g. --scores logme,knn")
    sort_by = sort or (DEFAULT_SCORE if DEFAULT_SCORE in names else names[0])
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        targets, from_db = _model_paths(models, db)
        options = data_options(text_column, text_pair_column, label_column, limit)
        dataset = load_data(data, split=split, zoo=zoo, options=options)
        skipped: list[str] = []
        passes = 2 if any(n in ("leep", "nce") for n in names) else 1
        total = len(targets) * len(dataset) * passes
        loaded = _load(targets, from_db, skipped, pooling=pooling, max_length=max_length)
        with count_progress("features", total, enabled=not quiet) as hook:
            rows = rank_models(
                loaded, dataset, scores=names, sort_by=sort_by, batch_size=batch_size, hook=hook
            )
        if from_db and not rows:
            raise RankError(
                f"no model in {db} that graft can load ({len(targets)} indexed); "
                f"skipped: {'; '.join(skipped)}"
            )
    except RankError as e:
        raise RecipeError(str(e)) from e
    finally:
        torch.set_num_threads(before)
    num_classes = len(np.unique(dataset.labels))
    doc = {
        "data": dataset.name,
        "num_samples": len(dataset),
        "num_classes": num_classes,
        "sort_by": sort_by,
        "ranking": rows,
        "skipped": skipped,
    }
    if as_json:
        echo_json(doc)
        return
    _print(doc, names, sort_by)


def _print(doc: dict, names: list[str], sort_by: str) -> None:
    from graft.cli.zoo_cmds import short_names

    rows = doc["ranking"]
    short, prefix = short_names([r["model"] for r in rows])
    title = (
        f"{doc['data']}: {doc['num_samples']} samples, {doc['num_classes']} classes; "
        f"sorted by {sort_by}"
    )
    table = Table("rank", "model", *names, "dim", title=safe(title))
    table.columns[1].overflow = "fold"
    for r in rows:
        cells = [_fmt(r["scores"][n], bold=n == sort_by) for n in names]
        table.add_row(str(r["rank"]), safe(short[r["model"]]), *cells, str(r["num_features"]))
    console = Console()
    console.print(table)
    if prefix:
        console.print(f"models under {safe(prefix)}")
    for r in rows:
        for note in r["notes"]:
            console.print(f"note: {safe(r['model'])}: {safe(note)}")
    for s in doc["skipped"]:
        console.print(f"skipped: {safe(s)}")


def _model_paths(models: list[str] | None, db: Path | None) -> tuple[list[tuple[str, str]], bool]:
    """``(path, how to name it when skipped)`` per model, and whether they come from --db."""
    from graft.find import RankError

    paths = [p.strip() for m in models or [] for p in m.split(",") if p.strip()]
    if paths and db is not None:
        raise RankError("pass --models or --db, not both")
    if paths:
        return [(p, p) for p in dict.fromkeys(paths)], False
    if db is None:
        raise RankError(
            "no models: pass --models PATH[,PATH...] or --db FILE (a `graft zoo scan` index)"
        )
    from graft.zoo.index import ZooIndex

    with ZooIndex(db, create=False) as index:
        records = index.models()
    if not records:
        raise RankError(f"{db} indexes no model; run `graft zoo scan PATH --db {db}`")
    return [
        (r.path, f"{r.name} ({r.architecture or 'unknown architecture'}") for r in records
    ], True


def _load(
    targets: list[tuple[str, str]],
    from_db: bool,
    skipped: list[str],
    *,
    pooling: str | None,
    max_length: int | None,
) -> Iterator:
    """Each model in turn (one in memory at a time); with --db, those graft cannot load are
    recorded in ``skipped`` instead of stopping the ranking."""
    from graft.find import RankError, load_model
    from graft.io import GraftIOError

    for path, label in targets:
        try:
            model = load_model(path, pooling=pooling, max_length=max_length)
        except (RankError, GraftIOError) as e:
            if not from_db:
                raise
            skipped.append(f"{label}: {e})")
            continue
        yield model
        del model


def _fmt(value: float | None, *, bold: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return f"[bold]{text}[/]" if bold else text
