"""``graft demo``: graft's main job on a real-data zoo it builds itself, no download."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._safe import echo_json, safe
from graft.recipe import RecipeError

ZOOS = ("auto", "digits", "text")


def demo(
    workdir: Annotated[Path, typer.Option(help="Folder for the zoo and the merges.")] = Path(
        "graft-demo"
    ),
    zoo: Annotated[
        str,
        typer.Option(
            "--zoo",
            help="digits (the quick first run, seconds), text (real MiniLM on 8 real text "
            "tasks: ~25 min to build once, ~30 min to merge), or auto: text when its zoo "
            "is already built in WORKDIR/text-zoo, else digits.",
        ),
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the zoo (splits, training).")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A smaller, faster zoo (smoke test).")
    ] = False,
    threads: Annotated[int, typer.Option(help="Tensors merged at once.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Build a real-data zoo, merge it with every method, evaluate each merge per task.

    Rows: the pretrained base with each task's head, the individual fine-tunes, and every
    merge method (hyperparameters chosen on validation data); columns: test accuracy per
    task, the average, and the average normalised by the fine-tuned accuracy. Writes
    WORKDIR/results.{json,md} (digits) or WORKDIR/text-results.{json,md} (text).
    """
    if zoo not in ZOOS:
        raise RecipeError(f"unknown zoo {zoo!r}; valid: {', '.join(ZOOS)}")
    if zoo == "auto":
        zoo = "text" if (workdir / "text-zoo" / "manifest.json").is_file() else "digits"
    if zoo == "text":
        _text_demo(workdir, seed=seed, quick=quick, threads=threads, as_json=as_json)
        return
    _digits_demo(workdir, seed=seed, quick=quick, threads=threads, as_json=as_json)


def _digits_demo(workdir: Path, *, seed: int, quick: bool, threads: int, as_json: bool) -> None:
    from graft._demo import run_demo, short

    console = Console(stderr=True)
    with console.status("starting") as status:
        result = run_demo(
            workdir, seed=seed, quick=quick, threads=threads, log=lambda m: status.update(safe(m))
        )
    if as_json:
        echo_json(result.to_json())
        return
    out = Console(width=max(Console().width, 132))  # the table is wide; don't squeeze it
    table = Table(title=f"test accuracy (%), digits zoo seed {seed}", title_justify="left")
    table.add_column("method", no_wrap=True)
    for t in result.tasks:
        table.add_column(short(t), justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm.", justify="right")
    for row in result.rows:
        table.add_row(
            row.method,
            *[f"{100 * row.accuracy[t]:.1f}" for t in result.tasks],
            f"{100 * row.mean():.1f}",
            f"{100 * result.normalized(row):.1f}",
        )
    out.print(table)
    soup = Table(title=f"model soups on {result.soup_task} (test %)", title_justify="left")
    soup.add_column("soup")
    soup.add_column("accuracy", justify="right")
    soup.add_column("settings")
    for row in result.soup:
        soup.add_row(row.method, f"{100 * row.mean():.1f}", row.settings)
    out.print(soup)
    skipped = "; ".join(f"{m}: {why}" for m, why in result.skipped.items())
    out.print(f"not in the table — {skipped}")
    out.print(
        f"done in {result.seconds:.0f}s; {workdir / 'results.json'}, "
        f"{workdir / 'results.md'}; merged models in {workdir / 'merged'}"
    )
    if not (workdir / "text-zoo" / "manifest.json").is_file():
        out.print("the benchmark on a real pretrained transformer: graft demo --zoo text")


def _text_demo(workdir: Path, *, seed: int, quick: bool, threads: int, as_json: bool) -> None:
    from graft.eval.zoo_bench import markdown_table, run_bench, text_bench_zoo
    from graft.io import write_text
    from graft.zoo import ZooError, ZooQualityError
    from graft.zoo.text_tasks import TextDataError
    from graft.zoo.text_zoo import build_text_zoo

    console = Console(stderr=True)
    root = workdir / "text-zoo"
    with console.status("starting") as status:

        def log(message: str) -> None:
            status.update(safe(message))
            console.log(safe(message))

        try:
            build_text_zoo(root, seed=seed, quick=quick, log=log)
        except TextDataError as e:
            raise RecipeError(f"{e} (or run `graft zoo fetch-data`)") from None
        except (ZooError, ZooQualityError) as e:
            raise RecipeError(str(e)) from None
        options = {"ada_steps": 5, "stats_samples": 32, "val_limit": 32} if quick else {}
        result = run_bench(text_bench_zoo(root), threads=threads, log=log, **options)
    write_text(workdir / "text-results.json", json.dumps(result.to_json(), indent=2))
    write_text(workdir / "text-results.md", markdown_table(result))
    if as_json:
        echo_json(result.to_json())
        return
    out = Console(width=max(Console().width, 150))
    table = Table(
        title=f"test accuracy (%), text zoo (MiniLM-L6) seed {seed}", title_justify="left"
    )
    table.add_column("method", no_wrap=True)
    for t in result.tasks:
        table.add_column(t.split("-")[0], justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm.", justify="right")
    table.add_column("chosen on val")
    for row in result.rows:
        table.add_row(
            row.method,
            *[f"{100 * row.accuracy[t]:.1f}" for t in result.tasks],
            f"{100 * row.mean():.1f}",
            f"{100 * result.normalized(row):.1f}",
            safe(row.settings),
        )
    out.print(table)
    out.print(
        f"done in {result.seconds:.0f}s; {workdir / 'text-results.json'}, "
        f"{workdir / 'text-results.md'}"
    )
