"""``graft soup uniform|greedy MODELS... --data VAL -o OUT``: model soups (Wortsman et al.
2022) of fine-tunes of one task, chosen on held-out data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from graft.cli._data_opts import (
    BatchSizeOpt,
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

KINDS = ("uniform", "greedy")


def soup(
    kind: Annotated[str, typer.Argument(help="uniform (average all) or greedy (Model soups).")],
    models: Annotated[list[Path], typer.Argument(help="Fine-tunes of one task (2 or more).")],
    data: Annotated[
        str, typer.Option("--data", help="Held-out labelled data of the task (not the test set).")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")],
    head: Annotated[
        list[Path] | None,
        typer.Option(
            "--head",
            help="One head for all, or one per model (the soup then averages them too). "
            "Default: each model's own classifier (averaged with the weights).",
        ),
    ] = None,
    keep_ties: Annotated[
        bool,
        typer.Option(
            "--keep-ties",
            help="Greedy: also add an ingredient that leaves accuracy unchanged (the paper's "
            ">=), not only one that raises it.",
        ),
    ] = False,
    zoo: ZooOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of a zoo task.")] = "val",
    threads: Annotated[int, typer.Option("--threads", min=0, help="Merge threads (0 = auto).")] = 0,
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    batch_size: BatchSizeOpt = 32,
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUT if it exists and graft wrote it.")
    ] = False,
    force_any: Annotated[
        bool,
        typer.Option(
            "--force-overwrite-anything",
            help="Like --force, but replace OUT even if graft did not write it.",
        ),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Model soups: average fine-tunes of one task, all of them or greedily.

    uniform averages every model; greedy (Model soups) sorts the models by held-out accuracy, start from the best, and add each next one only
    if the soup's held-out accuracy rises. Writes the soup to OUT (its card holds the recipe;
    the averaged head goes to OUT/head.safetensors when the heads are separate files).
    """
    from graft.data import load_head_file, save_head_file
    from graft.eval.candidates import CandidateMerger
    from graft.eval.soups import greedy_order, recipe_yaml
    from graft.eval.tasks import load_tasks, score
    from graft.plan import plan_merge, run_plan
    from graft.recipe import parse_recipe

    if kind not in KINDS:
        raise RecipeError(f"unknown soup {kind!r}; valid: {', '.join(KINDS)}")
    if len(models) < 2:
        raise RecipeError("a soup needs at least two models")
    if keep_ties and kind != "greedy":
        raise RecipeError("--keep-ties applies to greedy soups; a uniform soup takes every model")
    force = force or force_any
    heads = list(head or [])
    inputs = [*models, *heads, *([Path(data)] if Path(data).exists() else [])]
    check_output(out, inputs=inputs, force=force, overwrite_anything=force_any)
    if len(heads) not in (0, 1, len(models)):
        raise RecipeError(
            f"{len(heads)} --head for {len(models)} models; give none, one or one each"
        )
    names = [str(m) for m in models]
    if len(set(names)) != len(names):
        raise RecipeError("a model is listed twice; list each ingredient once")
    if not heads:
        _check_classifier_labels(models)
    options = data_options(text_column, text_pair_column, label_column, limit)
    (task,) = load_tasks(
        names[:1],
        [data],
        heads=heads[:1],
        zoo=zoo,
        split=split,
        options=options,
        pooling=pooling,
        max_length=max_length,
    )
    head_files = [load_head_file(h) for h in heads] if len(heads) == len(models) else []
    merger = CandidateMerger(threads=threads or None, scratch=out.parent.resolve())

    def soup_score(members) -> float:
        text = recipe_yaml(members)
        plan = plan_merge(parse_recipe(text), drop_hint=False)
        try:
            state = merger(plan)
        finally:
            plan.close()
        if head_files:
            _set_head(task.runner, [head_files[names.index(m)] for m in members])
        return score([task], state, batch_size=batch_size)[0]

    try:
        total = len(models) * 2 - 1 if kind == "greedy" else 1
        with count_progress(f"{kind} soup", total, unit="soups", enabled=not quiet) as hook:

            def counted(members):
                value = soup_score(members)
                hook(1)
                return value

            if kind == "greedy":
                chosen, alone, best, steps = greedy_order(names, counted, keep_ties=keep_ties)
            else:
                chosen, alone, steps = names, {}, []
                best = counted(names)
    finally:
        merger.close()
    text = recipe_yaml(
        chosen,
        comment=f"{kind} soup of {len(chosen)}/{len(names)} models, "
        f"held-out accuracy {best:.4f} on {task.data.name}",
    )
    plan = plan_merge(parse_recipe(text), drop_hint=False)
    try:
        run_plan(plan, out, threads=threads or None, force=force, overwrite_anything=force_any)
    finally:
        plan.close()
    if head_files:
        avg = _set_head(task.runner, [head_files[names.index(m)] for m in chosen])
        first = head_files[0]
        save_head_file(
            avg,
            out / "head.safetensors",
            task=first.task,
            label_names=first.label_names,
            pooling=first.pooling,
            max_length=first.max_length,
        )
    doc = {
        "kind": kind,
        "chosen": chosen,
        "alone": alone,
        "soup_accuracy": best,
        "steps": [{"model": m, "accuracy": a, "kept": k} for m, a, k in steps],
        "data": task.data.name,
        "out": str(out),
    }
    if as_json:
        echo_json(doc)
        return
    console = Console()
    for m in names:
        if m in alone:
            console.print(f"  {safe(m)}: {alone[m]:.2%} alone")
    for m, a, k in steps:
        console.print(f"  + {safe(m)}: soup {a:.2%} -> {'kept' if k else 'left out'}")
    console.print(
        f"{kind} soup of {len(chosen)}/{len(names)} models: held-out accuracy "
        f"{best:.2%}; written to {safe(str(out))}"
    )


def _set_head(runner, heads) -> torch.nn.Linear:
    """Put the uniform average of ``heads`` (head files) on the runner; return it."""
    linear = runner.module.head
    if linear is None:
        raise RecipeError(f"{runner.path} runs no linear head; per-model --head needs head files")
    with torch.no_grad():
        linear.weight.copy_(torch.stack([h.linear.weight for h in heads]).mean(0))
        linear.bias.copy_(torch.stack([h.linear.bias for h in heads]).mean(0))
    return linear


def _check_classifier_labels(models: list[Path]) -> None:
    """A soup of sequence classifiers averages their classifiers output by output (and is
    judged with the first one's label names), so every ingredient must name its outputs
    alike and in the same order."""
    from graft.data._loading import id2label_names, resolve_model
    from graft.io import open_checkpoint

    first: tuple[Path, tuple[str, ...]] | None = None
    for m in models:
        with open_checkpoint(resolve_model(m)) as ckpt:
            config = ckpt.config or {}
        labels = id2label_names(config.get("id2label") or {})
        if not labels:
            continue  # no names, or transformers' placeholders: nothing to compare
        if first is None:
            first = (m, labels)
        elif labels != first[1]:
            raise RecipeError(
                f"{m} names its outputs {', '.join(labels)[:120]}, {first[0]} names them "
                f"{', '.join(first[1])[:120]}; a soup averages classifiers output by output, "
                "so their labels must match in order (or soup the backbones with --head)"
            )
