"""``graft check OLD NEW``: what swapping model OLD for NEW breaks: flips, calibration,
label issues; an HTML report; exit code 1 when a ``--fail-on`` gate holds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from graft.recipe import RecipeError


def check(
    old: Path | None = typer.Argument(None, help="The model in use (zoo or HF model folder)."),
    new: Path | None = typer.Argument(None, help="The candidate replacing it."),
    task: str | None = typer.Option(
        None, "--task", help="Zoo task: its test split, val split for temperature, its head."
    ),
    data: str | None = typer.Option(
        None,
        "--data",
        help="Labelled data: a zoo task name, a .npz / .csv, or a folder with test.npz "
        "(+ val.npz). See docs/check.md.",
    ),
    zoo: Path = typer.Option(Path("graft-demo/zoo"), help="The zoo folder, for zoo models."),
    old_preds: Path | None = typer.Option(
        None, "--old-preds", help="Scores of the old model: .npz/.npy/.csv, (N, K)."
    ),
    new_preds: Path | None = typer.Option(None, "--new-preds", help="Scores of the new model."),
    labels: Path | None = typer.Option(None, "--labels", help="Labels (N,) for the preds files."),
    old_val_preds: Path | None = typer.Option(
        None, "--old-val-preds", help="Validation scores of the old model (temperature fit)."
    ),
    new_val_preds: Path | None = typer.Option(None, "--new-val-preds"),
    val_labels: Path | None = typer.Option(None, "--val-labels"),
    scores: str = typer.Option(
        "auto", "--scores", help="How to read preds files: auto, logits or probabilities."
    ),
    label_probs: Path | None = typer.Option(
        None,
        "--label-probs",
        help="Out-of-sample probabilities of a third model, for label issues.",
    ),
    label_issues: bool = typer.Option(
        True, "--label-issues/--no-label-issues", help="Look for likely label errors."
    ),
    report: Path | None = typer.Option(None, "--report", help="Write an HTML report here."),
    fail_on: str | None = typer.Option(
        None,
        "--fail-on",
        help="Exit 1 when any gate holds, e.g. 'nfr>0.02,new.ece>0.05' (names: see --json).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Compare NEW against OLD: flips (NFR, NFI, PFR, multi-class NFR), calibration
    (accuracy, NLL, Brier, ECE, MCE, before and after temperature scaling), label issues.

    Exit codes: 0 checked (and no --fail-on gate holds), 1 a --fail-on gate holds,
    2 bad input.
    """
    from graft.check.compare import jsonable
    from graft.check.gates import check_gates, parse_gates
    from graft.check.run import check_models, check_predictions

    gates = parse_gates(fail_on) if fail_on else []
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
            zoo=zoo,
            label_probs=label_probs,
            find_issues=label_issues,
        )
    failed = check_gates(gates, result["metrics"])
    result["fail_on"] = {"gates": [str(g) for g in gates], "failed": failed}
    if report is not None:
        from graft.io import write_text
        from graft.report import render_check_report

        write_text(report, render_check_report(result))
    if as_json:
        typer.echo(json.dumps(jsonable(result), indent=2, allow_nan=False))
    else:
        _print(result, report)
    if failed:
        print(f"check failed: {'; '.join(failed)}", file=sys.stderr)
        raise typer.Exit(1)


def _print(r: dict, report: Path | None) -> None:
    console = Console()
    console.print(f"[bold]{r['old']}[/] -> [bold]{r['new']}[/] on {r['data']} (n={r['n']})")
    table = Table(
        "metric",
        "old",
        "new",
        "old (T-scaled)",
        "new (T-scaled)",
        title=f"calibration: {r['n_bins']} bins; temperature from {r['temperature_fit']}",
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
    console.print(
        "most negative flips: "
        + ", ".join(f"class {c['class']}: {c['negative_flips']} of {c['n']}" for c in worst)
    )
    li = r.get("label_issues")
    if li:
        console.print(
            f"label issues ({r['label_issue_source']}): {li['n_flagged']} flagged ({li['rate']:.1%}); "
            f"accuracy old {li['old']['accuracy_all']:.2%} -> {li['old']['accuracy_unflagged']:.2%}, "
            f"new {li['new']['accuracy_all']:.2%} -> {li['new']['accuracy_unflagged']:.2%} "
            "without them; indices in --json"
        )
    else:
        console.print(f"label issues: {r.get('label_issue_source')}")
    if report is not None:
        console.print(f"report: {report}")
