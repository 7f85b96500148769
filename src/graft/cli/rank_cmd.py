"""``graft rank --data DATA --models PATHS | --db FILE``: which model to start from, by
transferability scores on frozen features (no fine-tuning)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from graft.recipe import RecipeError


def rank(
    data: str = typer.Option(
        ...,
        "--data",
        help="task:NAME (a digits-zoo task) or a .safetensors/.npz file with inputs and labels.",
    ),
    models: list[str] = typer.Option(
        None, "--models", help="Model folders (repeat, or comma-separated)."
    ),
    db: Path = typer.Option(
        None, "--db", help="Rank every model in this zoo index that graft can run."
    ),
    scores: str = typer.Option(
        "logme,leep,nce,hscore,knn,linear", "--scores", help="Comma-separated scores."
    ),
    sort: str = typer.Option(
        None, "--sort", help="Score to sort by (default: logme if requested, else the first)."
    ),
    split: str = typer.Option("train", "--split", help="Split of a zoo task."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Inputs per forward pass."),
    threads: int = typer.Option(
        None, "--threads", min=1, help="CPU threads for forward passes (default: torch's)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Rank models for a labelled data set by LogME, LEEP, NCE, H-score, kNN and linear probe."""
    from graft.find import DEFAULT_SCORE, RankError, load_data, load_model, rank_models

    names = [s.strip() for s in scores.split(",") if s.strip()]
    if not names:
        raise RecipeError("--scores is empty; e.g. --scores logme,knn")
    sort_by = sort or (DEFAULT_SCORE if DEFAULT_SCORE in names else names[0])
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        paths, skipped = _model_paths(models, db)
        X, y, described = load_data(data, split=split)
        loaded = [load_model(p) for p in paths]
        with _progress(len(loaded) * len(X), enabled=not quiet) as hook:
            rows = rank_models(
                loaded, X, y, scores=names, sort_by=sort_by, batch_size=batch_size, hook=hook
            )
    except RankError as e:
        raise RecipeError(str(e)) from e
    finally:
        torch.set_num_threads(before)
    doc = {
        "data": described,
        "num_samples": len(y),
        "num_classes": int(y.max()) + 1,
        "sort_by": sort_by,
        "ranking": rows,
        "skipped": skipped,
    }
    if as_json:
        typer.echo(json.dumps(doc, indent=2))
        return
    from graft.cli.zoo_cmds import short_names

    short, prefix = short_names([r["model"] for r in rows])
    title = f"{described}: {len(y)} samples, {doc['num_classes']} classes; sorted by {sort_by}"
    table = Table("rank", "model", *names, "dim", title=title)
    table.columns[1].overflow = "fold"
    for r in rows:
        cells = [_fmt(r["scores"][n], bold=n == sort_by) for n in names]
        table.add_row(str(r["rank"]), escape(short[r["model"]]), *cells, str(r["num_features"]))
    console = Console()
    console.print(table)
    if prefix:
        console.print(f"models under {escape(prefix)}")
    for r in rows:
        for note in r["notes"]:
            console.print(f"note: {escape(r['model'])}: {escape(note)}")
    for s in skipped:
        console.print(f"skipped: {escape(s)}")


def _model_paths(models: list[str] | None, db: Path | None) -> tuple[list[str], list[str]]:
    from graft.find import RankError
    from graft.find.rank import RUNNERS

    paths = [p.strip() for m in models or [] for p in m.split(",") if p.strip()]
    if paths and db is not None:
        raise RankError("pass --models or --db, not both")
    if paths:
        return list(dict.fromkeys(paths)), []
    if db is None:
        raise RankError(
            "no models: pass --models PATH[,PATH...] or --db FILE (a `graft zoo scan` index)"
        )
    from graft.zoo.index import ZooIndex

    with ZooIndex(db, create=False) as index:
        records = index.models()
    runnable = [r.path for r in records if r.architecture in RUNNERS]
    skipped = [
        f"{r.name} ({r.architecture or 'unknown architecture'}: graft cannot run it)"
        for r in records
        if r.architecture not in RUNNERS
    ]
    if not runnable:
        raise RankError(
            f"no model in {db} that graft can run ({', '.join(RUNNERS)}); {len(records)} indexed"
        )
    return runnable, skipped


@contextmanager
def _progress(total: int, *, enabled: bool):
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]features"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task("features", total=total)
        yield lambda n: progress.advance(task, n)


def _fmt(value: float | None, *, bold: bool) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return f"[bold]{text}[/]" if bold else text
