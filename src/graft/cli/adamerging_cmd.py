"""``graft adamerging BASE MODEL... --data D... -o RECIPE``: learn task-arithmetic
coefficients by entropy minimisation on unlabeled inputs (AdaMerging, Yang et al. 2024)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

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
from graft.io._atomic import check_output
from graft.recipe import RecipeError


def adamerging(
    base: Annotated[Path, typer.Argument(help="The base (pretrained) model folder.")],
    models: Annotated[list[Path], typer.Argument(help="The fine-tuned models, one per task.")],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="Unlabeled inputs of each task, one per model in order (labels, if any, "
            "are not read): .csv/.jsonl text, .npz, image folder or task:NAME.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Write the learned recipe here.")],
    head: Annotated[
        list[Path] | None,
        typer.Option(
            "--head",
            help="Each task's head, one per model (default: the zoo's head for task:NAME, "
            "else each model's own classifier or head.safetensors).",
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="layer: one coefficient per task per parameter tensor (the paper's "
            "layer-wise); task: one per task; block: one per task per residual block.",
        ),
    ] = "layer",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Adam steps.")] = 500,
    lr: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 1e-3,
    init: Annotated[float, typer.Option("--init", help="Initial coefficient.")] = 0.3,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Inputs per task per step.")
    ] = 16,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the batch draws.")] = 0,
    zoo: ZooOpt = None,
    split: Annotated[
        str, typer.Option("--split", help="Split of zoo tasks (paper: test).")
    ] = "test",
    merge_to: Annotated[
        Path | None, typer.Option("--merge", help="Also merge the learned recipe into this folder.")
    ] = None,
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Replace the outputs if they exist (--merge: only one graft wrote)."
        ),
    ] = False,
    force_any: Annotated[
        bool,
        typer.Option(
            "--force-overwrite-anything",
            help="Like --force, but replace the --merge folder even if graft did not write it.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """AdaMerging: learn merge coefficients by entropy minimisation on unlabeled inputs.

    Learns the coefficients for MODELS over BASE and writes them as a task_arithmetic
    recipe (lambda 1, each model's weight its coefficients); --merge also
    runs it. All models are held in memory while learning.
    """
    from graft.eval.adamerging import MODES, learn, recipe_yaml
    from graft.eval.tasks import load_tasks
    from graft.io import load_state_dict, write_text

    if mode not in MODES:
        raise RecipeError(f"unknown --mode {mode!r}; valid: {', '.join(MODES)}")
    if lr <= 0:
        raise RecipeError(f"--lr must be > 0, got {lr}")
    force = force or force_any
    inputs = [base, *models, *(head or []), *(Path(d) for d in data if Path(d).exists())]
    check_output(out, inputs=inputs, force=force, kind="file")
    if merge_to is not None:
        check_output(merge_to, inputs=inputs, force=force, overwrite_anything=force_any)
        if out.resolve().is_relative_to(merge_to.resolve()):
            raise RecipeError(
                f"the recipe {out} would be inside the --merge folder {merge_to}; write it "
                "elsewhere (the merge replaces that folder)"
            )
    options = data_options(text_column, text_pair_column, label_column, limit, require_labels=False)
    tasks = load_tasks(
        [str(m) for m in models],
        data,
        heads=head or [],
        zoo=zoo,
        split=split,
        options=options,
        pooling=pooling,
        max_length=max_length,
        per_model=True,
    )
    base_state = load_state_dict(base)
    finetuned = [load_state_dict(m) for m in models]
    for m, state in zip(models, finetuned, strict=True):
        missing = [n for n, t in base_state.items() if t.is_floating_point() and n not in state]
        if missing:
            raise RecipeError(
                f"{m} lacks tensor {missing[0]} of the base {base}; same architecture?"
            )
    with count_progress("adamerging", steps, unit="steps", enabled=not quiet) as hook:
        result = learn(
            tasks,
            base_state,
            finetuned,
            mode=mode,
            steps=steps,
            lr=lr,
            init=init,
            batch_size=batch_size,
            seed=seed,
            progress=hook,
        )
    # Absolute paths: the recipe is read from wherever it is written, by whoever runs it.
    pinned = lambda p: str(Path(p).resolve()) if Path(p).exists() else str(p)  # noqa: E731
    text = recipe_yaml(
        result, pinned(base), {t.name: pinned(m) for t, m in zip(tasks, models, strict=True)}
    )
    write_text(out, text)
    if merge_to is not None:
        from graft.plan import plan_merge, run_plan
        from graft.recipe import parse_recipe

        plan = plan_merge(parse_recipe(text), drop_hint=False)
        try:
            run_plan(plan, merge_to, force=force, overwrite_anything=force_any)
        finally:
            plan.close()
    doc = {
        "mode": mode,
        "tasks": [t.name for t in tasks],
        "groups": len(result.groups),
        "entropy_initial": result.entropy_initial,
        "entropy_final": result.entropy_final,
        "recipe": str(out),
        "merged": str(merge_to) if merge_to else None,
        "coefficients": result.coefficients if mode != "layer" else None,
    }
    if as_json:
        echo_json(doc)
        return
    Console().print(
        f"AdaMerging ({mode}-wise, {len(result.groups)} coefficient(s) per task): entropy "
        f"{result.entropy_initial:.4f} -> {result.entropy_final:.4f}; recipe {safe(str(out))}"
        + (f", merged into {safe(str(merge_to))}" if merge_to else "")
    )
