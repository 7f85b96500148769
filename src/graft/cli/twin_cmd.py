"""``graft twin MODEL... --base B --data VAL... -o OUT``: Twin-Merging (Lu et al. 2024) —
a shared expert, each task's SVD-compressed exclusive part and a router, in one folder
that ``graft eval OUT`` runs as the dynamic model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from graft.cli._data_opts import (
    JsonOpt,
    LimitOpt,
    MaxLengthOpt,
    PairColumnOpt,
    PoolingOpt,
    QuietOpt,
    TextColumnOpt,
    ZooOpt,
    data_options,
)
from graft.cli._safe import echo_json, safe


def twin(
    models: Annotated[list[Path], typer.Argument(help="The fine-tuned models, one per task.")],
    base: Annotated[Path, typer.Option("--base", help="The base (pretrained) model.")],
    data: Annotated[
        list[str],
        typer.Option(
            "--data",
            help="Validation inputs of each task, one per model in order (the router learns "
            "which task an input is from; labels are not read): .csv/.jsonl, .npz, image "
            "folder or task:NAME.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="The Twin-Merging folder to write.")],
    method: Annotated[
        str, typer.Option("--method", help="Shared expert: task_arithmetic or ties.")
    ] = "task_arithmetic",
    lam: Annotated[
        float | None,
        typer.Option("--lambda", help="Shared expert's λ (default 0.3 task arithmetic, 1 TIES)."),
    ] = None,
    density: Annotated[
        float | None, typer.Option("--density", help="TIES density (default 0.2).")
    ] = None,
    keep: Annotated[
        float | None,
        typer.Option(
            "--keep",
            help="Rank kept of each exclusive matrix, as a fraction of its smaller side "
            "(default 0.1, the paper's; 1 keeps them exactly).",
        ),
    ] = None,
    rank: Annotated[
        int | None, typer.Option("--rank", help="Fixed rank of every exclusive matrix.")
    ] = None,
    router_steps: Annotated[
        int, typer.Option("--router-steps", help="Router training steps (Adam, lr 5e-4).")
    ] = 1000,
    router_hidden: Annotated[
        int | None, typer.Option("--router-hidden", help="Router width (default 2 x features).")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the router and the SVDs.")] = 0,
    zoo: ZooOpt = None,
    split: Annotated[str, typer.Option("--split", help="Split of zoo tasks.")] = "val",
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    threads: Annotated[
        int | None, typer.Option("--threads", min=1, help="Tensors processed at once.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if graft wrote it.")] = False,
    force_any: Annotated[
        bool,
        typer.Option("--force-overwrite-anything", help="Replace OUT whatever it is."),
    ] = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Twin-Merging: shared expert + compressed exclusive parts + a router.

    Writes OUT/shared (the merged model), OUT/exclusive/<task>.safetensors (low-rank
    patches against it), OUT/router.safetensors and OUT/twin.json. `graft eval OUT`
    runs the dynamic model, each input routed.
    """
    from graft.recipe import RecipeError
    from graft.twin import build_twin

    if split not in ("test", "val", "train"):
        raise RecipeError(f"unknown split {split!r}; valid splits: test, val, train")
    log = (lambda m: None) if quiet or as_json else (lambda m: Console(stderr=True).print(safe(m)))
    report = build_twin(
        base,
        models,
        data,
        out,
        method=method,
        lam=lam,
        density=density,
        keep=keep,
        rank=rank,
        router_steps=router_steps,
        router_hidden=router_hidden,
        seed=seed,
        zoo=zoo,
        split=split,
        options=data_options(text_column, text_pair_column, "label", limit, require_labels=False),
        pooling=pooling,
        max_length=max_length,
        threads=threads,
        force=force or force_any,
        overwrite_anything=force_any,
        log=log,
    )
    s = report.storage
    doc = {
        "out": str(report.out),
        "tasks": report.tasks,
        "router_train_accuracy": report.router_accuracy,
        "storage": s,
        "storage_ratio": s["total"] / max(s["finetuned"], 1),
        "seconds": report.seconds,
        "warnings": report.warnings,
    }
    if as_json:
        echo_json(doc)
        return
    console = Console()
    for w in report.warnings:
        Console(stderr=True).print(f"warning: {safe(w)}")
    console.print(
        f"Twin-Merging of {len(report.tasks)} tasks into {safe(str(report.out))}: shared "
        f"{_mb(s['shared'])} + exclusive {_mb(s['exclusive'])} + router {_mb(s['router'])} "
        f"= {_mb(s['total'])} ({doc['storage_ratio']:.0%} of the {len(report.tasks)} "
        f"fine-tunes' {_mb(s['finetuned'])}); router accuracy on its data "
        f"{report.router_accuracy:.1%}"
    )


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


# --- graft eval on a Twin-Merging folder -----------------------------------------------


def open_if_twin(model: Path, routing: str | None):
    """The opened Twin-Merging folder ``model`` (`graft.twin.open_twin`), or None for any
    other model (then ``--routing`` is an error)."""
    from graft.recipe import RecipeError
    from graft.twin import ROUTINGS, is_twin_dir, open_twin

    if not is_twin_dir(model):
        if routing is not None:
            raise RecipeError(f"--routing applies to Twin-Merging folders; {model} is not one")
        return None
    if routing is not None and routing not in ROUTINGS:
        raise RecipeError(f"unknown --routing {routing!r}; valid: {', '.join(ROUTINGS)}")
    return open_twin(model)


def evaluate_routed(twin, runner, dataset, routing, batch_size, progress) -> dict:
    """Accuracy, loss and mean routing weights of the dynamic model."""
    return twin.evaluate(runner, dataset, routing=routing, batch_size=batch_size, progress=progress)
