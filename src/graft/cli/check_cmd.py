"""``graft check OLD NEW``: what swapping model OLD for NEW breaks: flips, calibration,
label issues; an HTML report; exit code 1 when a ``--fail-on`` gate holds."""

from __future__ import annotations

import sys
from functools import partial
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
    TextColumnOpt,
    ZooOpt,
    data_options,
)
from graft.cli._progress import count_progress
from graft.cli._safe import echo_json, safe
from graft.recipe import RecipeError


def check(
    old: Annotated[
        Path | None,
        typer.Argument(help="The model in use (HF, sentence-transformers or zoo folder)."),
    ] = None,
    new: Annotated[Path | None, typer.Argument(help="The candidate replacing it.")] = None,
    task: Annotated[
        str | None,
        typer.Option(
            "--task", help="Zoo task: its test split (unless --data), val split and head."
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Labelled data: .csv/.tsv/.jsonl (text + label), .npz (x or input_ids + "
            "labels; *_val keys: validation), an image folder, a folder with test.* (+ val.*), "
            "or task:NAME. See docs/check.md.",
        ),
    ] = None,
    val_data: Annotated[
        str | None,
        typer.Option(
            "--val-data", help="Validation data for temperature scaling (same formats as --data)."
        ),
    ] = None,
    head: HeadOpt = None,
    old_head: Annotated[
        Path | None, typer.Option("--old-head", help="OLD's head, when it differs from NEW's.")
    ] = None,
    new_head: Annotated[
        Path | None, typer.Option("--new-head", help="NEW's head, when it differs from OLD's.")
    ] = None,
    zoo: ZooOpt = None,
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    batch_size: BatchSizeOpt = 32,
    old_preds: Annotated[
        Path | None,
        typer.Option("--old-preds", help="Scores of the old model: .npz/.npy/.csv, (N, K)."),
    ] = None,
    new_preds: Annotated[
        Path | None, typer.Option("--new-preds", help="Scores of the new model.")
    ] = None,
    labels: Annotated[
        Path | None, typer.Option("--labels", help="Labels (N,) for the preds files.")
    ] = None,
    old_val_preds: Annotated[
        Path | None,
        typer.Option(
            "--old-val-preds", help="Validation scores of the old model (temperature fit)."
        ),
    ] = None,
    new_val_preds: Annotated[Path | None, typer.Option("--new-val-preds")] = None,
    val_labels: Annotated[Path | None, typer.Option("--val-labels")] = None,
    scores: Annotated[
        str,
        typer.Option("--scores", help="How to read preds files: auto, logits or probabilities."),
    ] = "auto",
    label_probs: Annotated[
        Path | None,
        typer.Option(
            "--label-probs", help="Out-of-sample probabilities of a third model, for label issues."
        ),
    ] = None,
    label_issues: Annotated[
        bool, typer.Option("--label-issues/--no-label-issues", help="Look for likely label errors.")
    ] = True,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write an HTML report here.")
    ] = None,
    fail_on: Annotated[
        str | None,
        typer.Option(
            "--fail-on",
            help="Exit 1 when any gate holds, e.g. 'nfr>0.02,new.ece>0.05' (names: see --json).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Compare NEW against OLD: flips (NFR, NFI, PFR, multi-class NFR), calibration
    (accuracy, NLL, Brier, ECE, MCE, before and after temperature scaling), label issues.

    Both models run on the same data with their heads (--head, --old-head/--new-head, the
    zoo's head for task:NAME, or the model's own classifier); labels are mapped through
    each head's label list, and NEW's outputs put in OLD's label order.

    Exit codes: 0 checked (and no --fail-on gate holds), 1 a --fail-on gate holds,
    2 bad input.
    """
    from graft.check.gates import check_gates, parse_gates
    from graft.check.run import check_models, check_predictions

    gates = parse_gates(fail_on) if fail_on else []
    if report is not None:  # before any model runs: the report must not overwrite an input
        from graft.io._atomic import check_output

        given = (old, new, head, old_head, new_head, old_preds, new_preds, labels, label_probs)
        given += (old_val_preds, new_val_preds, val_labels)
        inputs = [p for p in given if p is not None]
        inputs += [Path(d) for d in (data, val_data) if d is not None and Path(d).exists()]
        check_output(report, inputs=inputs, force=True, kind="file")
    if scores not in ("auto", "logits", "probabilities"):
        raise RecipeError(f"unknown --scores {scores!r}; valid: auto, logits, probabilities")
    preds = (old_preds, new_preds, labels)
    if any(p is not None for p in preds):
        if old is not None or new is not None or None in preds:
            raise RecipeError(
                "give either two models (OLD NEW) or all of --old-preds, --new-preds and --labels"
            )
        val = (old_val_preds, new_val_preds, val_labels)
        if any(v is not None for v in val) and None in val:
            raise RecipeError(
                "give all of --old-val-preds, --new-val-preds and --val-labels, or none"
            )
        result = check_predictions(
            old_preds,
            new_preds,
            labels,
            val=None if val[0] is None else val,
            label_probs=label_probs,
            kind=scores,
        )
    else:
        if old is None or new is None:
            raise RecipeError(
                "give two models, OLD NEW (with --task or --data), or predictions files "
                "(--old-preds, --new-preds, --labels)"
            )
        result = check_models(
            old,
            new,
            task=task,
            data=data,
            val_data=val_data,
            zoo=zoo,
            head=head,
            old_head=old_head,
            new_head=new_head,
            options=data_options(text_column, text_pair_column, label_column, limit),
            pooling=pooling,
            max_length=max_length,
            batch_size=batch_size,
            label_probs=label_probs,
            find_issues=label_issues,
            progress=partial(count_progress, enabled=not quiet),
        )
    failed = check_gates(gates, result["metrics"])
    result["fail_on"] = {"gates": [str(g) for g in gates], "failed": failed}
    if report is not None:
        from graft.io import write_text
        from graft.report import render_check_report

        write_text(report, render_check_report(result))
    if as_json:
        echo_json(result)
    else:
        _print(result, report)
    if failed:
        print(f"check failed: {'; '.join(failed)}", file=sys.stderr)
        raise typer.Exit(1)


def _print(r: dict, report: Path | None) -> None:
    console = Console()
    console.print(
        f"[bold]{safe(r['old'])}[/] -> [bold]{safe(r['new'])}[/] on {safe(r['data'])} (n={r['n']})"
    )
    heads = r.get("heads")
    if heads:
        console.print(f"heads: old {safe(heads['old'])}, new {safe(heads['new'])}")
    table = Table(
        "metric",
        "old",
        "new",
        "old (T-scaled)",
        "new (T-scaled)",
        title=f"calibration: {r['n_bins']} bins; temperature from {safe(r['temperature_fit'])}",
    )
    o, n = r["models"]["old"], r["models"]["new"]
    for key in ("accuracy", "nll", "brier", "ece", "ece_mass", "mce"):
        table.add_row(key, *(f"{m[key]:.4f}" for m in (o, n, o["scaled"], n["scaled"])))
    table.add_row("temperature", "", "", f"{o['temperature']:.3f}", f"{n['temperature']:.3f}")
    console.print(table)
    f = r["flips"]
    console.print(
        f"flips: NFR {f['nfr']:.2%} ({f['negative_flips']} old-right now wrong), "
        f"NFI {f['nfi']:.2%}, PFR {f['pfr']:.2%} ({f['positive_flips']}), "
        f"multi-class NFR {f['multiclass_nfr']:.2%}"
    )
    worst = sorted(f["per_class"], key=lambda c: -c["negative_flips"])[:3]
    names = r.get("label_names")
    console.print(
        "most negative flips: "
        + ", ".join(
            f"class {safe(names[c['class']]) if names else c['class']}: "
            f"{c['negative_flips']} of {c['n']}"
            for c in worst
        )
    )
    li = r.get("label_issues")
    if li:
        console.print(
            f"label issues ({safe(r['label_issue_source'])}): {li['n_flagged']} flagged ({li['rate']:.1%}); "
            f"accuracy old {li['old']['accuracy_all']:.2%} -> {li['old']['accuracy_unflagged']:.2%}, "
            f"new {li['new']['accuracy_all']:.2%} -> {li['new']['accuracy_unflagged']:.2%} "
            "without them; indices in --json"
        )
    else:
        console.print(f"label issues: {safe(str(r.get('label_issue_source')))}")
    for note in r.get("notes") or []:
        console.print(f"note: {safe(note)}")
    if report is not None:
        console.print(f"report: {safe(str(report))}")
