"""``graft eval MODEL --data FILE [--head H]``: accuracy and loss of a model on data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from graft.cli._data_opts import (
    BatchSizeOpt,
    HeadOpt,
    JsonOpt,
    LabelColumnOpt,
    LimitOpt,
    MaxLengthOpt,
    PairColumnOpt,
    PoolingOpt,
    QuietOpt,
    SplitOpt,
    TextColumnOpt,
    ZooOpt,
    data_options,
)
from graft.cli._progress import count_progress
from graft.cli._safe import echo_json, safe
from graft.recipe import RecipeError


def eval_model(
    model: Annotated[
        Path, typer.Argument(help="Model folder (HF, sentence-transformers, zoo, merge).")
    ],
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data",
            help="Labelled data (repeat for several): .csv/.tsv/.jsonl, .npz, image folder, "
            "or task:NAME.",
        ),
    ] = None,
    task: Annotated[
        list[str] | None,
        typer.Option("--task", help="Zoo task (repeat, or 'all'): shorthand for --data task:NAME."),
    ] = None,
    head: HeadOpt = None,
    zoo: ZooOpt = None,
    split: SplitOpt = "test",
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    batch_size: BatchSizeOpt = 32,
    routing: Annotated[
        str | None,
        typer.Option(
            "--routing",
            help="Twin-Merging folders only: route each input (input, the default) or "
            "each batch by its mean routing weights (batch).",
        ),
    ] = None,
    modulator: Annotated[
        str | None,
        typer.Option(
            "--modulator",
            help="EMR folders only: the task whose model (base + its modulator) to run; "
            "default: each task:NAME's own; 'unified' for the shared model.",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Accuracy and loss of MODEL on labelled data, with a classification head.

    Reports accuracy, mean cross-entropy and the number of examples per data set.
    The head is --head, else for task:NAME data the zoo's head of that task (how merged
    backbones are judged: each task with its own head), else the model's own classifier
    (a *ForSequenceClassification folder) or its head.safetensors.
    An EMR folder (`graft merge` with emr) runs task:NAME with task NAME's own model,
    the base plus its modulator (--modulator picks another, or unified).
    """
    from graft.data import evaluate, open_model_data

    if split not in ("test", "val", "train"):
        raise RecipeError(f"unknown split {split!r}; valid splits: test, val, train")
    specs = list(data or []) + _task_specs(task or [], zoo)
    if not specs:
        raise RecipeError("nothing to evaluate on: pass --data FILE (or --task NAME)")
    options = data_options(text_column, text_pair_column, label_column, limit)
    results = {}
    from graft.cli.twin_cmd import evaluate_routed, open_if_twin

    twin = open_if_twin(model, routing)  # a Twin-Merging folder runs as the dynamic model
    from graft.delta.emr import is_emr_folder

    emr = twin is None and is_emr_folder(model)  # an EMR folder runs each task's own model
    if modulator is not None and not emr:
        raise RecipeError(
            f"--modulator applies to EMR folders (`graft merge` with emr); {model} is not one"
        )
    for spec in dict.fromkeys(specs):
        runner, dataset = open_model_data(
            model if twin is None else twin.shared,
            spec,
            head=head,
            zoo=zoo,
            split=split,
            options=options,
            pooling=pooling,
            max_length=max_length,
        )
        params = _emr_params(runner, model, spec, modulator) if emr else None
        with count_progress(f"eval {spec}", len(dataset), enabled=not quiet) as hook:
            if twin is None:
                r = evaluate(runner, dataset, batch_size=batch_size, params=params, progress=hook)
            else:
                r = evaluate_routed(twin, runner, dataset, routing, batch_size, hook)
        results[spec] = {**r, "head": runner.head_source, "data": dataset.name}
    if as_json:
        doc = {"model": str(model), "split": split, "results": results}
        echo_json(doc, default=str)
        return
    table = Table("data", "accuracy", "loss", "n", title=safe(f"{model}"))
    for spec, r in results.items():
        table.add_row(safe(spec), f"{r['accuracy']:.2%}", f"{r['loss']:.4f}", str(r["n"]))
    if len(results) > 1:
        mean = sum(r["accuracy"] for r in results.values()) / len(results)
        table.add_row("mean", f"{mean:.2%}", "", "")
    Console().print(table)


def _task_specs(tasks: list[str], zoo: Path | None) -> list[str]:
    """``task:NAME`` specs; ``all`` expands to every head the zoo keeps."""
    if "all" not in tasks:
        return [f"task:{t}" for t in tasks]
    from graft.data.resolve import DEFAULT_ZOOS
    from graft.zoo.build import ZooError, zoo_tasks

    root = zoo or DEFAULT_ZOOS["digits"]
    try:
        names = zoo_tasks(root)
    except ZooError as e:
        raise RecipeError(f"{e}; run `graft demo` to build the digits zoo") from None
    return [f"task:{t}" for t in names] + [f"task:{t}" for t in tasks if t != "all"]


def _emr_params(runner, model: Path, spec: str, modulator: str | None):
    """The weights of the EMR task model ``spec`` asks for (None: the unified model)."""
    from graft.delta.emr import read_manifest, task_state

    name = modulator or (spec.removeprefix("task:") if spec.startswith("task:") else None)
    if name == "unified":
        return None
    manifest = read_manifest(model)
    if name is None:
        valid = ", ".join(t.name for t in manifest.tasks)
        raise RecipeError(
            f"{model} is an EMR folder: each task has its own model; pass --modulator "
            f"NAME ({valid}) or --modulator unified for the shared model"
        )
    manifest.task(name)  # fails naming the folder's tasks
    return runner.bind(task_state(model, name), where=f"EMR task {name}'s model")
