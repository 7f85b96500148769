"""``graft demo``: graft's main job on a real-data zoo it builds itself, no download."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft._demo import run_demo, short


def demo(
    workdir: Path = typer.Option(Path("graft-demo"), help="Folder for the zoo and the merges."),
    seed: int = typer.Option(0, help="Seed of the zoo (splits, training)."),
    quick: bool = typer.Option(False, "--quick", help="A smaller, faster zoo (smoke test)."),
    threads: int = typer.Option(2, help="Tensors merged at once."),
    as_json: bool = typer.Option(False, "--json", help="Print results.json instead of the table."),
) -> None:
    """Build the digits zoo (7 tasks on real scans), merge it with every method, evaluate.

    Rows: the pretrained base with linear probes, the individual fine-tunes, and every
    merge method (λ chosen on validation data); columns: test accuracy per task, the
    average, and the average normalised by the fine-tuned accuracy. Also writes
    WORKDIR/results.json and WORKDIR/results.md, and a model soup table.
    """
    console = Console(stderr=True)
    with console.status("starting") as status:
        result = run_demo(workdir, seed=seed, quick=quick, threads=threads,
                          log=lambda m: status.update(m))
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    out = Console(width=max(Console().width, 132))  # the table is wide; don't squeeze it
    table = Table(title=f"test accuracy (%), digits zoo seed {seed}", title_justify="left")
    table.add_column("method", no_wrap=True)
    for t in result.tasks:
        table.add_column(short(t), justify="right")
    table.add_column("avg", justify="right", style="bold")
    table.add_column("norm.", justify="right")
    for row in result.rows:
        table.add_row(row.method, *[f"{100 * row.accuracy[t]:.1f}" for t in result.tasks],
                      f"{100 * row.mean():.1f}", f"{100 * result.normalized(row):.1f}")
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
    out.print(f"done in {result.seconds:.0f}s; {workdir / 'results.json'}, "
              f"{workdir / 'results.md'}; merged models in {workdir / 'merged'}")
