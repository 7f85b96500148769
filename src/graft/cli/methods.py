"""``graft methods``: every merge method, its parameters, one line on what it does."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._safe import echo_json, safe
from graft.merge import METHODS, REQUIRED


def methods(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List the merge methods a recipe's merge_method can name."""
    rows = []
    for spec in METHODS.values():
        params = [
            {
                "name": p.name,
                "type": p.kind.__name__,
                "per_model": p.per_model,
                "default": None if p.default is REQUIRED else p.default,
                "required": p.default is REQUIRED,
                "doc": p.doc,
            }
            for p in spec.params
        ]
        rows.append(
            {
                "name": spec.name,
                "base": spec.base,
                "summary": spec.summary,
                "paper": spec.paper,
                "params": params,
            }
        )
    if as_json:
        echo_json(rows)
        return
    table = Table("method", "base model", "parameters", "what it does", show_lines=True)
    for r in rows:
        ps = ", ".join(
            p["name"]
            + ("*" if p["required"] else f"={p['default']}")
            + (" (per model)" if p["per_model"] else "")
            for p in r["params"]
        )
        table.add_row(safe(r["name"]), safe(r["base"]), safe(ps or "-"), safe(r["summary"]))
    console = Console()
    console.print(table)
    console.print(
        "* required.  Per-model parameters go under each model's parameters: (or globally)."
    )
