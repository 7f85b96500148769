"""``graft continual add STATE MODEL`` and ``graft continual show STATE``: continual
merging by orthogonal projection (OPCM), one model at a time, from a saved state."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from graft.cli._progress import tensor_progress
from graft.cli._safe import echo_json, safe
from graft.io import parse_size
from graft.recipe import RecipeError

continual_app = typer.Typer(
    help="Continual merging (OPCM): add fine-tunes one at a time to a saved merge state.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@continual_app.command("add")
def add(
    state: Path = typer.Argument(
        ..., help="State folder: new or empty for the first model, else an earlier step's."
    ),
    model: str = typer.Argument(..., help="The next fine-tuned model (folder, file or hub id)."),
    base: str = typer.Option(
        None, "--base", help="Base model; needed for the first model, then recorded."
    ),
    alpha: float = typer.Option(
        None,
        help="Share of the merged delta's singular-value sum whose components are "
        "protected, in [0, 1) (default 0.5); fixed by the first model.",
    ),
    no_project: list[str] = typer.Option(
        [],
        "--no-project",
        help="Tensor-name substring whose 2-D tensors are added without projection, e.g. "
        "'embeddings' (the reference projects Linear weights only). Repeatable; first model only.",
    ),
    device: str = typer.Option("cpu", help="Device for the math: cpu, cuda, cuda:1, ..."),
    threads: int = typer.Option(0, help="Tensors computed at once (0 = cores, at most 4)."),
    out_shard_size: str = typer.Option(
        "5GB", "--out-shard-size", help="Largest shard of STATE/model, e.g. 5GB, 500MB."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge MODEL into the continual merge at STATE; STATE/model is the merged model.

    Each new task vector is projected off the subspace the merged one spans (per 2-D
    tensor) and the sum rescaled to the mean task-vector norm. Only STATE is read besides
    the base and MODEL, so earlier models may be gone; STATE is replaced atomically.
    `graft merge STATE/recipe.yaml OUT` gives the same model in one go.
    """
    from graft.plan.continual import continual_add

    if threads < 0:
        raise RecipeError("--threads must be >= 0")
    if alpha is not None and not (0.0 <= alpha < 1.0):
        raise RecipeError(f"--alpha must be in [0, 1), got {alpha}; the reference uses 0.5")
    shard_bytes = parse_size(out_shard_size, what="--out-shard-size")
    with tensor_progress("merging", 0, 0, enabled=not quiet) as hook:
        result = continual_add(
            state,
            model,
            base=base,
            alpha=alpha,
            no_project=no_project,
            threads=threads or None,
            device=device,
            max_shard_bytes=shard_bytes,
            progress=hook,
        )
    summary = {
        "state": str(result.state),
        "model": str(result.model),
        "step": result.step,
        "models": result.models,
        "merged_tensors": result.merged_tensors,
        "copied_tensors": result.copied_tensors,
        "seconds": round(result.seconds, 3),
        "notes": result.notes,
    }
    if as_json:
        echo_json(summary)
        return
    console = Console()
    console.print(
        f"step {result.step}: merged {safe(model)} into {safe(result.model)} "
        f"({result.merged_tensors} tensors merged, {result.copied_tensors} copied) "
        f"in {result.seconds:.1f}s"
    )
    for note in result.notes:
        console.print(f"note: {safe(note)}")


@continual_app.command("show")
def show(
    state: Path = typer.Argument(..., help="A state folder `graft continual add` wrote."),
    as_json: bool = typer.Option(False, "--json", help="Print it as JSON."),
) -> None:
    """The base, the models merged so far (in arrival order) and the parameters of STATE."""
    import yaml

    from graft.plan.continual import read_continual_state

    recipe = read_continual_state(state)
    doc = yaml.safe_load(recipe.text)
    info = {
        "state": str(state),
        "model": str(state / "model"),
        "base_model": doc["base_model"],
        "models": [m["model"] for m in doc["models"]],
        "parameters": doc["parameters"],
    }
    if as_json:
        echo_json(info)
        return
    console = Console()
    console.print(f"[bold]{safe(state)}[/]: opcm, base {safe(info['base_model'])}")
    for i, m in enumerate(info["models"], 1):
        console.print(f"  {i}. {safe(m)}")
    console.print(f"parameters: {safe(info['parameters'])}")
