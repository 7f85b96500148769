"""``graft demo``: graft's main job on models it generates itself, no download."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft._demo import run_demo


def demo(
    workdir: Path = typer.Option(Path("graft-demo"), help="Folder for the generated models."),
    threads: int = typer.Option(2, help="Tensors computed at once."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Generate a tiny Llama-shaped base and 3 fine-tunes, merge them with every method.

    Prints, per method, the time and the cosine between the merged delta and each
    fine-tune's delta (1.0 = that fine-tune fully kept, 0 = lost).
    """
    console = Console(stderr=as_json)
    with console.status("building the model family and merging with every method..."):
        rows = run_demo(workdir, threads=threads, log=lambda m: console.print(m))
    loaded = _check_with_transformers(workdir / "merged" / "ties")
    if as_json:
        typer.echo(json.dumps(
            {"workdir": str(workdir), "transformers_check": loaded,
             "rows": [{"method": r.method, "seconds": r.seconds, "cosines": r.cosines} for r in rows]},
            indent=2,
        ))
        return
    table = Table("method", "seconds", "cos(task0)", "cos(task1)", "cos(task2)", "mean")
    for r in rows:
        cells = [f"{c:.3f}" for c in r.cosines] + [""] * (3 - len(r.cosines))
        table.add_row(r.method, f"{r.seconds:.2f}", *cells, f"{sum(r.cosines) / len(r.cosines):.3f}")
    console.print(table)
    console.print(f"merged models are in {workdir / 'merged'}; {loaded}")


def _check_with_transformers(path: Path) -> str:
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError:
        return "transformers not installed: skipped the load check"
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        logits = model(torch.arange(8).unsqueeze(0)).logits
    ok = bool(torch.isfinite(logits).all())
    return f"transformers loads {path.name} and its logits are {'finite' if ok else 'NOT finite'}"
