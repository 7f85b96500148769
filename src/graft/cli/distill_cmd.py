"""``graft distill`` (knowledge transfer between any two models) and ``graft update``
(compatible model updates): train one model against another's outputs, write it to OUT,
report on held-out data.

Two commands, not ``distill --compatible``: they train different models toward different
ends — distill trains the *student* to gain what a teacher knows and reports the transfer
delta; update trains the *new* model on labels while keeping the *old* model's right
answers and reports negative flips. Each has its own losses and options; both run the same
library loop (`graft.distill`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.table import Table

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

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output model folder.")]
DataReq = Annotated[
    str,
    typer.Option(
        "--data",
        help="Training data: .csv/.tsv/.jsonl (text + label), .npz, an image folder, or "
        "task:NAME (its --split).",
    ),
]
EvalDataOpt = Annotated[
    str | None,
    typer.Option(
        "--eval-data",
        help="Held-out labelled data for the report (default: a task's test split, else "
        "--holdout of --data).",
    ),
]
HoldoutOpt = Annotated[
    float,
    typer.Option(
        "--holdout", min=0.0, max=0.9, help="Without --eval-data: fraction of --data held out."
    ),
]
SplitOpt = Annotated[str, typer.Option("--split", help="Split of a zoo task to train on.")]
StepsOpt = Annotated[int, typer.Option("--steps", min=1, help="Optimiser steps.")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per step.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the data order (and holdout).")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Replace OUT if it exists and graft wrote it.")
]
ForceAnyOpt = Annotated[
    bool,
    typer.Option(
        "--force-overwrite-anything",
        help="Like --force, but replace OUT even if graft did not write it.",
    ),
]
HeadPath = Annotated[Path | None, typer.Option(help="Its head file or classifier folder.")]


def _read(data, eval_data, holdout, seed, split, zoo, options):
    """Training data and held-out data (module docstring of `graft.distill.run`)."""
    from graft.data import DataError, read_data
    from graft.data.resolve import default_zoo
    from graft.distill import holdout_split

    if split not in ("train", "val", "test"):
        raise DataError(f"unknown --split {split!r}; valid: train, val, test")
    train = read_data(data, options, zoo=default_zoo(data, zoo), split=split)
    labelled = data_options(
        options.text_column, options.text_pair_column, options.label_column, options.limit
    )
    if eval_data is not None:
        return train, read_data(eval_data, labelled, zoo=default_zoo(eval_data, zoo), split="test")
    if train.task is not None and split != "test":
        return train, read_data(data, labelled, zoo=default_zoo(data, zoo), split="test")
    if train.labels is None:
        raise DataError(f"{train.name} has no labels; pass --eval-data (labelled) for the report")
    if holdout <= 0:
        raise DataError("no held-out data: pass --eval-data or a --holdout fraction above 0")
    return holdout_split(train, holdout, seed)


def _prepare(
    models,
    data,
    eval_data,
    holdout,
    seed,
    split,
    zoo,
    make_options,
    *,
    out,
    force,
    force_any,
    pooling,
    max_length,
):
    """What distill and update share before training: refuse an OUT that would hit an
    input, then check the data options (``make_options()``, in that order, as each command
    did), read the training and held-out data and load each ``(path, head, role)`` model."""
    from graft.distill.run import load_model
    from graft.io import check_output

    heads = [h for _, h, _ in models]
    inputs = _inputs(*(m for m, _, _ in models), *heads, data, eval_data)
    check_output(out, inputs=inputs, force=force or force_any, overwrite_anything=force_any)
    train, held = _read(data, eval_data, holdout, seed, split, zoo, make_options())
    load = dict(task=train.task, zoo=zoo, pooling=pooling, max_length=max_length)
    runners = [load_model(m, head=h, role=role, **load) for m, h, role in models]
    return inputs, train, held, runners


def _inputs(*paths) -> list[Path]:
    return [Path(p) for p in paths if p is not None and Path(p).exists()]


def _card(verb: str, models: dict, data: str, report: dict) -> str:
    summary = {k: v for k, v in report.items() if not isinstance(v, dict) or k == "settings"}
    return yaml.safe_dump({"graft": verb, **models, "data": data, **summary}, sort_keys=False)


def distill(
    teacher: Annotated[Path, typer.Option("--teacher", help="The model to learn from.")],
    student: Annotated[Path, typer.Option("--student", help="The model to train.")],
    data: DataReq,
    out: OutOpt,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="kd (Hinton), dp (data-partitioned: teacher only where it is more confident "
            "on the true class) or dp-unsupervised (by top-class confidence; no labels).",
        ),
    ] = "dp",
    eval_data: EvalDataOpt = None,
    holdout: HoldoutOpt = 0.2,
    teacher_head: Annotated[
        Path | None, typer.Option("--teacher-head", help="The teacher's head (file or folder).")
    ] = None,
    student_head: Annotated[
        Path | None, typer.Option("--student-head", help="The student's head (file or folder).")
    ] = None,
    steps: StepsOpt = 200,
    lr: LrOpt = 1e-4,
    batch_size: BatchOpt = 32,
    seed: SeedOpt = 0,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Softmax temperature τ of the KL terms.")
    ] = 2.0,
    alpha: Annotated[
        float | None,
        typer.Option(
            "--alpha",
            help="Weight of distillation vs cross-entropy (default 0.5 for kd, 1 for dp).",
        ),
    ] = None,
    keep_weight: Annotated[
        float, typer.Option("--keep-weight", help="dp: weight of the KL to the initial student.")
    ] = 1.0,
    zoo: ZooOpt = None,
    split: SplitOpt = "train",
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    force: ForceOpt = False,
    force_any: ForceAnyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Transfer knowledge from TEACHER to STUDENT (any two models with heads for the same
    labels), and write the trained student to OUT.

    kd is plain distillation; dp learns from the teacher only on examples where it is
    more confident than the student was, and keeps the initial student's outputs
    elsewhere (Roth et al. 2024), so a weaker teacher cannot drag the student down.
    Reports, on held-out data: accuracies before and after, the transfer delta, and the
    flips from the student before to after (positive = gained, negative = forgotten).
    """
    from graft.data import DataError
    from graft.distill import DISTILL_MODES, save_trained
    from graft.distill import distill as run

    if mode not in DISTILL_MODES:
        raise DataError(f"unknown --mode {mode!r}; valid: {', '.join(DISTILL_MODES)}")
    inputs, train, held, (t, s) = _prepare(
        [(teacher, teacher_head, "teacher"), (student, student_head, "student")],
        data, eval_data, holdout, seed, split, zoo,
        lambda: data_options(
            text_column, text_pair_column, label_column, limit,
            require_labels=mode != "dp-unsupervised",
        ),
        out=out, force=force, force_any=force_any, pooling=pooling, max_length=max_length,
    )  # fmt: skip
    report = run(
        t, s, train, held, mode=mode, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        temperature=temperature, alpha=alpha, keep_weight=keep_weight,
        progress=lambda label, n, unit: count_progress(label, n, unit=unit, enabled=not quiet),
    )  # fmt: skip
    models = {"teacher": str(teacher), "student": str(student)}
    save_trained(
        s, out, sources=[str(student), str(teacher)], card_yaml=_card("distill", models, data, report),
        title=f"graft distill ({mode}) of {teacher.name} into {student.name}", inputs=inputs,
        force=force or force_any, overwrite_anything=force_any,
    )  # fmt: skip
    report.update(models, data=data, out=str(out))
    if as_json:
        echo_json(report)
        return
    _print_distill(report, s)


def _print_distill(r: dict, runner) -> None:
    console = Console()
    f = r["flips"]
    table = Table(
        "", "accuracy", title=safe(f"distill ({r['mode']}) on {r['held_out']} (n={r['n']})")
    )
    table.add_row("teacher", f"{r['teacher_accuracy']:.2%}")
    table.add_row("student before", f"{r['student_before']:.2%}")
    table.add_row("student after", f"{r['student_after']:.2%}")
    table.add_row("transfer delta", f"{r['transfer_delta']:+.2%}")
    console.print(table)
    console.print(
        f"flips student before -> after: {f['positive_flips']} gained (PFR {f['pfr']:.2%}), "
        f"{f['negative_flips']} forgotten (NFR {f['nfr']:.2%}); teacher-only right answers: "
        f"{r['complementary']:.2%} of examples, {r['gained']:.1%} of them gained"
    )
    if r["mode"] != "kd":
        console.print(f"taught by the teacher: {r['taught_by_teacher']:.1%} of training examples")
    _print_written(console, r["out"], runner)


def _print_written(console: Console, out: str, runner) -> None:
    from graft.data.heads import HEAD_FILE

    head = Path(out) / HEAD_FILE
    note = f" with its head {safe(str(head))} (pass it as --head)" if head.exists() else ""
    if not head.exists() and runner.kind == "transformers" and not runner.head_names:
        note = f" (its classifier stays that of {safe(runner.head_source)}: pass it as --head)"
    console.print(f"written to {safe(out)}{note}")


def update(
    old: Annotated[Path, typer.Option("--old", help="The model in use.")],
    new: Annotated[Path, typer.Option("--new", help="The new model to fine-tune.")],
    data: DataReq,
    out: OutOpt,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="fd-kl / fd-lm (focal distillation, KL or logit matching), muscle, or ce "
            "(plain fine-tuning).",
        ),
    ] = "fd-kl",
    eval_data: EvalDataOpt = None,
    holdout: HoldoutOpt = 0.2,
    old_head: Annotated[
        Path | None, typer.Option("--old-head", help="OLD's head (file or folder).")
    ] = None,
    new_head: Annotated[
        Path | None, typer.Option("--new-head", help="NEW's head (file or folder).")
    ] = None,
    steps: StepsOpt = 200,
    lr: LrOpt = 1e-4,
    batch_size: BatchOpt = 32,
    seed: SeedOpt = 0,
    temperature: Annotated[
        float, typer.Option("--temperature", help="Softmax temperature τ of the KL terms.")
    ] = 1.0,
    fd_alpha: Annotated[
        float, typer.Option("--fd-alpha", min=0.0, help="Focal weight on every example (α).")
    ] = 1.0,
    fd_beta: Annotated[
        float,
        typer.Option("--fd-beta", min=0.0, help="Extra focal weight where OLD is right (β)."),
    ] = 5.0,
    weight: Annotated[
        float, typer.Option("--weight", min=0.0, help="Weight λ of the distillation term.")
    ] = 1.0,
    baseline: Annotated[
        bool,
        typer.Option("--baseline", help="Also run plain fine-tuning (not written) to compare."),
    ] = False,
    zoo: ZooOpt = None,
    split: SplitOpt = "train",
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    force: ForceOpt = False,
    force_any: ForceAnyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Fine-tune NEW on labelled data while keeping OLD's right answers (a compatible
    update), and write it to OUT.

    fd-kl / fd-lm add a distillation term toward OLD weighted α + β·1[OLD right] (focal
    distillation, Yan et al. 2021); muscle distils from OLD where OLD is more likely than
    NEW on the true class and from NEW as given elsewhere (Echterhoff et al. 2024).
    Reports, on held-out data, accuracy and the negative flip rate against OLD before and
    after (and for plain fine-tuning with --baseline); `graft check OLD OUT` shows more.
    """
    from graft.data import DataError
    from graft.distill import UPDATE_MODES, save_trained
    from graft.distill import update as run

    if mode not in UPDATE_MODES:
        raise DataError(f"unknown --mode {mode!r}; valid: {', '.join(UPDATE_MODES)}")
    inputs, train, held, (o, n) = _prepare(
        [(old, old_head, "old model"), (new, new_head, "new model")],
        data, eval_data, holdout, seed, split, zoo,
        lambda: data_options(text_column, text_pair_column, label_column, limit),
        out=out, force=force, force_any=force_any, pooling=pooling, max_length=max_length,
    )  # fmt: skip
    report = run(
        o, n, train, held, mode=mode, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
        temperature=temperature, fd_alpha=fd_alpha, fd_beta=fd_beta, weight=weight,
        baseline=baseline,
        progress=lambda label, k, unit: count_progress(label, k, unit=unit, enabled=not quiet),
    )  # fmt: skip
    models = {"old": str(old), "new": str(new)}
    save_trained(
        n, out, sources=[str(new), str(old)], card_yaml=_card("update", models, data, report),
        title=f"graft update ({mode}) of {new.name} compatible with {old.name}", inputs=inputs,
        force=force or force_any, overwrite_anything=force_any,
    )  # fmt: skip
    report.update(models, data=data, out=str(out))
    if as_json:
        echo_json(report)
        return
    console = Console()
    table = Table(
        "NEW", "accuracy", "NFR", "negative flips", "PFR",
        title=safe(f"update ({mode}) on {report['held_out']} (n={report['n']}); "
                   f"OLD accuracy {report['old_accuracy']:.2%}"),
    )  # fmt: skip
    rows = [("as given", "before"), ("plain fine-tune", "baseline"), (f"{mode} (OUT)", "after")]
    for label, key in rows:
        if key in report:
            r = report[key]
            f = r["flips"]
            table.add_row(
                label, f"{r['accuracy']:.2%}", f"{f['nfr']:.2%}", str(f["negative_flips"]),
                f"{f['pfr']:.2%}",
            )  # fmt: skip
    console.print(table)
    if "nfr_reduction" in report:
        console.print(f"negative flips vs plain fine-tuning: {-report['nfr_reduction']:+.1%}")
    _print_written(console, report["out"], n)


def sft(
    model: Annotated[Path, typer.Argument(help="The model to fine-tune (θ₀).")],
    data: DataReq,
    out: OutOpt,
    density: Annotated[
        float,
        typer.Option("--density", help="Share of the backbone's entries left free (top-K)."),
    ] = 0.05,
    patch: Annotated[
        Path | None,
        typer.Option(
            "--patch",
            help="Also write OUT − MODEL as a sparse graft patch (lossless), for "
            "`graft apply MODEL PATCH... -o ...` to compose.",
        ),
    ] = None,
    eval_data: EvalDataOpt = None,
    holdout: HoldoutOpt = 0.2,
    head: Annotated[
        Path | None, typer.Option("--head", help="MODEL's head (file or folder).")
    ] = None,
    steps: StepsOpt = 200,
    reset_steps: Annotated[
        int | None,
        typer.Option(
            "--reset-steps", min=1, help="Steps of the sparse re-training (default --steps)."
        ),
    ] = None,
    lr: LrOpt = 1e-4,
    batch_size: BatchOpt = 32,
    seed: SeedOpt = 0,
    zoo: ZooOpt = None,
    split: SplitOpt = "train",
    text_column: TextColumnOpt = "text",
    text_pair_column: PairColumnOpt = None,
    label_column: LabelColumnOpt = "label",
    limit: LimitOpt = None,
    max_length: MaxLengthOpt = None,
    pooling: PoolingOpt = None,
    force: ForceOpt = False,
    force_any: ForceAnyOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Lottery-ticket sparse fine-tuning (LT-SFT, Ansell et al. 2022): fine-tune MODEL
    fully, keep the --density share of backbone entries that moved most, reset, and
    re-train only those. Writes the model to OUT and, with --patch, its sparse difference
    from MODEL; several such patches (a task's, a domain's) compose with `graft apply`.
    """
    from graft.data import predict
    from graft.distill import save_trained
    from graft.distill.sft import check_density, lt_sft

    check_density(density)  # before the data and the model are read
    inputs, train, held, (runner,) = _prepare(
        [(model, head, "model")], data, eval_data, holdout, seed, split, zoo,
        lambda: data_options(text_column, text_pair_column, label_column, limit),
        out=out, force=force, force_any=force_any, pooling=pooling, max_length=max_length,
    )  # fmt: skip
    if patch is not None:
        from graft.delta._common import file_output
        from graft.io import check_output

        check_output(file_output(patch), inputs=inputs, force=force or force_any)
    train = runner.prepare(train)
    held = runner.prepare(held)
    bars = lambda label, k, unit: count_progress(label, k, unit=unit, enabled=not quiet)  # noqa: E731

    def accuracy() -> float:
        return float((predict(runner, held).argmax(1) == held.labels).mean())

    before = accuracy()
    report = lt_sft(
        runner, train, density=density, steps=steps, reset_steps=reset_steps, lr=lr,
        batch_size=batch_size, seed=seed, progress=bars,
    )  # fmt: skip
    report.pop("masks")
    report.update(before=before, after=accuracy(), held_out=held.name, n=len(held))
    models = {"model": str(model)}
    save_trained(
        runner, out, sources=[str(model)], card_yaml=_card("sft", models, data, report),
        title=f"graft sft (LT-SFT, density {density:g}) of {model.name}", inputs=inputs,
        force=force or force_any, overwrite_anything=force_any,
    )  # fmt: skip
    if patch is not None:
        report["patch"] = str(_write_patch(Path(out), model, patch, force or force_any))
    report.update(models, data=data, out=str(out))
    if as_json:
        echo_json(report)
        return
    console = Console()
    console.print(
        f"LT-SFT of {safe(str(model))}: {report['kept']:,} of {report['backbone_entries']:,} "
        f"backbone entries free ({density:.2%}), {report['changed']:,} changed; accuracy on "
        f"{safe(report['held_out'])} {before:.2%} -> {report['after']:.2%}"
    )
    if patch is not None:
        console.print(f"patch written to {safe(report['patch'])}")
    _print_written(console, report["out"], runner)


def _write_patch(out: Path, model: Path, patch: Path, force: bool) -> Path:
    """OUT − MODEL as a ``nonzero`` patch: a dense delta in a temp folder, then compressed."""
    import tempfile

    from graft.delta import get_compressor
    from graft.delta._common import file_output
    from graft.delta.compress import compress
    from graft.delta.passes import diff

    with tempfile.TemporaryDirectory(prefix=".graft-sft-", dir=out.parent) as tmp:
        dense = Path(tmp) / "delta.safetensors"
        diff(out, model, dense)
        compress(dense, patch, method=get_compressor("nonzero"), params={}, force=force)
    return file_output(patch)
