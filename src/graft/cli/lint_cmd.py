"""``graft lint PATH``: risks and defects of a checkpoint, found without running it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._safe import echo_json, safe

_STYLE = {"risk": "bold red", "error": "red", "warning": "yellow", "info": "dim"}


def lint(
    path: Path = typer.Argument(..., help="Model folder, .safetensors, .bin/.pt or .pkl file."),
    data: str | None = typer.Option(
        None, "--data", help="Data to measure the model card's accuracy claims on (as check)."
    ),
    task: str | None = typer.Option(None, "--task", help="Zoo task, for zoo models' claims."),
    zoo: Path = typer.Option(Path("graft-demo/zoo"), help="The zoo folder, for zoo models."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Scan pickles for code (without unpickling), and tensors for NaN/Inf, all-zero or
    duplicated tensors, degenerate conv filters and dtype anomalies; with --data, compare
    the model card's model-index accuracy with the measured one.

    Exit codes: 0 nothing risky, 1 a risk (unsafe pickle) or an error (NaN/Inf) found,
    2 bad input.
    """
    from graft.check.lint import lint_path

    report = lint_path(path, data=data, task=task, zoo=zoo)
    if as_json:
        echo_json(report)
    else:
        _print(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _print(r: dict) -> None:
    console = Console()
    console.print(
        f"[bold]{safe(r['path'])}[/]: {len(r['files'])} files, {r['tensors']} tensors, "
        f"{r['params']:,} parameters, {len(r['pickles'])} pickles scanned"
    )
    if r["findings"]:
        table = Table("severity", "check", "finding")
        for f in r["findings"]:
            severity = f"[{_STYLE[f['severity']]}]{f['severity']}[/]"
            table.add_row(severity, f["check"], safe(f["message"]))
        console.print(table)
    for c in r["conv_layers"]:
        console.print(
            f"  conv {safe(c['tensor'])}: {c['filters']} filters, near zero "
            f"{c['near_zero']:.1%}, near constant {c['near_constant']:.1%}"
        )
    for c in r["claims"]:
        console.print(
            f"  claim {c['claimed']:.2%} on {safe(c['dataset'])} vs measured "
            f"{c['measured']:.2%} on {safe(c['data'])} (n={c['n']})"
        )
    console.print(
        "[green]no risks or errors[/]" if r["ok"] else "[bold red]risks or errors found[/]"
    )
