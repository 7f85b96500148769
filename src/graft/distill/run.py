"""Knowledge transfer between any two models graft runs, and compatible model updates.

`distill` trains a student from a teacher (`graft.distill.losses`: KD, DP, unsupervised DP);
`update` trains a new model so that it keeps the old model's right answers (focal
distillation, MUSCLE). Both run the one training loop, `graft.data.train.finetune`, with a
loss over precomputed targets:

* the teacher (old model) and the initial student (new model as given) are frozen and run
  in eval mode, so their logits on the training data are computed once, each model with its
  own tokenizer or inputs, before training — the two models may be of any architectures;
* the teacher's logits are put in the student's label order (by label name when both
  heads name their labels, else in id order), and the labels must agree example by example;
* the student trains every weight it is saved with: its backbone and its head (a head file,
  or its own classifier); a classifier borrowed from another folder (``--student-head``
  naming a sequence-classification model) stays frozen.

Reports are measured on held-out data the training never sees: accuracies before and
after, the transfer delta (after − before), and flips between the student before and
after (`graft.check.flips`): positive flips are knowledge gained, negative flips forgotten.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import numpy as np
import torch

from graft.check.flips import flips
from graft.data import DataError, Dataset, Runner, predict
from graft.data.train import finetune
from graft.distill import losses

# ``progress(label, total, unit)`` gives a context whose value advances a bar by n.
ProgressFactory = Callable[[str, int, str], AbstractContextManager[Callable[[int], None]]]


def _no_bar(label: str, total: int, unit: str):
    return nullcontext(lambda n: None)


def load_model(
    model,
    *,
    head=None,
    task: str | None = None,
    zoo=None,
    pooling: str | None = None,
    max_length: int | None = None,
    role: str = "model",
) -> Runner:
    """A model with a head: ``head``, else its own (classifier or ``head.safetensors``),
    else the zoo's fine-tuned head of ``task``. Unlike ``graft eval``, a model's own head
    wins over the zoo's, so two models of different widths can share ``task:NAME`` data.

    Raises:
        DataError: no head is found, or the model cannot be run.
    """
    from graft.data import load_runner
    from graft.data.resolve import default_zoo, zoo_head

    runner = load_runner(model, head=head, pooling=pooling, max_length=max_length)
    if not runner.has_head and head is None and task is not None:
        found = zoo_head(default_zoo(f"task:{task}", zoo), task)
        if found is not None:
            runner = load_runner(model, head=found, pooling=pooling, max_length=max_length)
    if not runner.has_head:
        raise DataError(
            f"the {role} {model} has no classification head; pass its head (a head file, or "
            "a sequence-classification model folder whose classifier to use)"
        )
    return runner


def label_order(ref: Runner, other: Runner, roles: tuple[str, str]) -> np.ndarray | None:
    """Columns that put ``other``'s logits in ``ref``'s label order (None: same order).

    Raises:
        DataError: the heads score different numbers or sets of classes.
    """
    a, b = ref.label_names, other.label_names
    if ref.num_classes != other.num_classes:
        raise DataError(
            f"the {roles[0]}'s head ({ref.head_source}) has {ref.num_classes} classes, the "
            f"{roles[1]}'s ({other.head_source}) {other.num_classes}; both need heads for the "
            f"same labels (pass --{roles[0].split()[0]}-head / --{roles[1].split()[0]}-head)"
        )
    if a is None or b is None or a == b:
        return None
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:5]
        raise DataError(
            f"the {roles[0]}'s and the {roles[1]}'s heads name different labels "
            f"({', '.join(only)} in only one); use heads trained on the same labels"
        )
    index = {name: i for i, name in enumerate(b)}
    return np.array([index[name] for name in a])


def holdout_split(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, held_out)``: a seeded random ``fraction`` of ``data`` held out.

    Raises:
        DataError: too few examples to hold any out.
    """
    n_out = int(round(fraction * len(data)))
    if not 0 < n_out < len(data):
        raise DataError(
            f"{data.name}: {len(data)} examples leave nothing to hold out at --holdout "
            f"{fraction}; pass --eval-data (held-out labelled data) or a larger file"
        )
    perm = np.random.default_rng(seed).permutation(len(data))
    return data.subset(np.sort(perm[n_out:])), data.subset(np.sort(perm[:n_out]))


def _logits(runner: Runner, data: Dataset, batch_size: int, hook) -> torch.Tensor:
    return torch.from_numpy(predict(runner, data, batch_size=batch_size, progress=hook)).float()


def _fitted(ref: Runner, other: Runner, data: Dataset, order, roles) -> tuple[Dataset, Dataset]:
    """``data`` in each model's label ids, after checking the two agree on every example."""
    a, b = ref.prepare(data), other.prepare(data)
    if a.labels is not None and b.labels is not None:
        theirs = b.labels if order is None else np.argsort(order)[b.labels]
        if not np.array_equal(a.labels, theirs):
            raise DataError(
                f"{data.name}: the {roles[0]}'s and the {roles[1]}'s heads read its labels "
                "differently; give both heads label names (or the same label order)"
            )
    return a, b


def _targets(ref, other, data, order, roles, batch_size, bar, label):
    """``ref``-fitted data, ``other``'s logits in ``ref``'s label order, ``ref``'s logits."""
    mine, theirs = _fitted(ref, other, data, order, roles)
    with bar(label, 2 * len(data), "examples") as hook:
        z_other = _logits(other, theirs, batch_size, hook)
        z_ref = _logits(ref, mine, batch_size, hook)
    if order is not None:
        z_other = z_other[:, torch.from_numpy(order)]
    return mine, z_other, z_ref


def saved_parameters(runner: Runner) -> Callable[[str], bool]:
    """Module parameter name -> whether it is saved with the model (and so trained)."""
    names = set(runner.names)
    has_linear = isinstance(getattr(runner.module, "head", None), torch.nn.Linear)
    return lambda n: n in names or (has_linear and n.startswith("head."))


def _train(runner, data, loss_fn, *, steps, lr, batch_size, seed, bar) -> list[float]:
    with bar(f"train {runner.path.name}", steps, "steps") as hook:
        return finetune(
            runner,
            data,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            trainable=saved_parameters(runner),
            loss_fn=loss_fn,
            sparse_embeddings=runner.kind == "transformers",
            progress=hook,
        )


def _with_dummy_labels(data: Dataset, runner: Runner) -> Dataset:
    """Unlabelled data for unsupervised DP: zeros stand in for labels the loss never reads."""
    names = runner.label_names or tuple(str(i) for i in range(runner.num_classes))
    return replace(data, labels=np.zeros(len(data), dtype=np.int64), label_names=tuple(names))


def distill(
    teacher: Runner,
    student: Runner,
    train: Dataset,
    held_out: Dataset,
    *,
    mode: str = "dp",
    steps: int = 200,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    temperature: float = 2.0,
    alpha: float | None = None,
    keep_weight: float = 1.0,
    eval_batch_size: int = 64,
    progress: ProgressFactory | None = None,
) -> dict:
    """Train ``student`` in place from ``teacher`` on ``train``; report on ``held_out``.

    Args:
        mode: ``kd``, ``dp`` or ``dp-unsupervised`` (`graft.distill.losses`).
        alpha: weight of the distillation term against CE (default 0.5 for ``kd``, 1 for
            the DP modes, as in the paper); ``dp-unsupervised`` uses no labels (α = 1).
        keep_weight: DP's weight on the KL to the initial student (λ).

    Returns:
        The report (`transfer_report`, plus the share of training examples the teacher taught).

    Raises:
        DataError: an unknown mode, models with different label sets, data they cannot run.
    """
    if mode not in losses.DISTILL_MODES:
        raise DataError(f"unknown --mode {mode!r}; valid: {', '.join(losses.DISTILL_MODES)}")
    alpha = (0.5 if mode == "kd" else 1.0) if alpha is None else alpha
    if mode == "dp-unsupervised":
        alpha = 1.0
    elif train.labels is None:
        raise DataError(
            f"{train.name} has no labels; --mode {mode} needs them (or dp-unsupervised)"
        )
    if not 0.0 <= alpha <= 1.0 or temperature <= 0 or keep_weight < 0:
        raise DataError("need 0 <= --alpha <= 1, --temperature > 0 and --keep-weight >= 0")
    roles = ("student", "teacher")
    order = label_order(student, teacher, roles)
    bar = progress or _no_bar
    fit, z_t, z_s0 = _targets(
        student, teacher, train, order, roles, eval_batch_size, bar, "targets"
    )
    if fit.labels is None:
        fit = _with_dummy_labels(fit, student)
    y_all = None if mode == "dp-unsupervised" else torch.from_numpy(fit.labels)
    mask = losses.partition(z_t, z_s0, y_all)

    def loss_fn(logits, labels, idx):
        i = torch.from_numpy(idx)
        if mode == "kd":
            return losses.kd_loss(logits, z_t[i], labels, temperature=temperature, alpha=alpha)
        return losses.dp_loss(
            logits, z_t[i], z_s0[i], mask[i], temperature=temperature,
            keep_weight=keep_weight, labels=labels, alpha=alpha,
        )  # fmt: skip

    test, t_test, before = _targets(
        student, teacher, held_out, order, roles, eval_batch_size, bar, "before"
    )
    run = _train(
        student, fit, loss_fn, steps=steps, lr=lr, batch_size=batch_size, seed=seed, bar=bar
    )
    with bar("after", len(test), "examples") as hook:
        after = _logits(student, test, eval_batch_size, hook)
    report = transfer_report(test.labels, t_test, before, after)
    report.update(
        mode=mode,
        settings={
            "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
            "temperature": temperature, "alpha": alpha, "keep_weight": keep_weight,
        },
        taught_by_teacher=float(mask.double().mean()) if mode != "kd" else 1.0,
        loss_first=run[0], loss_last=run[-1],
        n_train=len(fit), held_out=test.name,
    )  # fmt: skip
    return report


def transfer_report(y: np.ndarray, teacher, before, after) -> dict:
    """Accuracies, the transfer delta and flips on held-out labels ``y`` (logits in).

    ``complementary``: share of examples the teacher gets right and the student (before)
    wrong — what there is to learn; ``gained``: the share of those the student gets right
    after; ``flips``: `graft.check.flips` from the student before to after.
    """
    t, b, a = (np.asarray(z.argmax(1)) for z in (teacher, before, after))
    k = int(teacher.shape[1])
    comp = (t == y) & (b != y)
    f = flips(y, b, a, k)
    f.pop("per_class")
    acc_b, acc_a = float((b == y).mean()), float((a == y).mean())
    return {
        "n": int(len(y)),
        "teacher_accuracy": float((t == y).mean()),
        "student_before": acc_b,
        "student_after": acc_a,
        "transfer_delta": acc_a - acc_b,
        "complementary": float(comp.mean()),
        "gained": float(((a == y) & comp).sum() / comp.sum()) if comp.any() else 0.0,
        "flips": f,
    }


def update(
    old: Runner,
    new: Runner,
    train: Dataset,
    held_out: Dataset,
    *,
    mode: str = "fd-kl",
    steps: int = 200,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    temperature: float = 1.0,
    fd_alpha: float = 1.0,
    fd_beta: float = 5.0,
    weight: float = 1.0,
    baseline: bool = False,
    eval_batch_size: int = 64,
    progress: ProgressFactory | None = None,
) -> dict:
    """Fine-tune ``new`` in place on labelled ``train`` with a compatibility loss toward
    ``old`` (`graft.distill.losses`); report NFR and accuracy on ``held_out``.

    Args:
        mode: ``fd-kl``, ``fd-lm`` (focal distillation), ``muscle``, or ``ce`` (plain
            fine-tuning, the reference).
        fd_alpha, fd_beta: focal weights α + β·1[old right].
        weight: λ, the distillation term's weight against CE.
        baseline: also fine-tune a copy with plain CE (same steps, seed and data order)
            and report it; the copy is discarded.

    Returns:
        ``old_accuracy``, ``before`` / ``after`` (/ ``baseline``): each NEW's accuracy and
        its flips against OLD (`graft.check.flips`), and the NFR change against plain
        fine-tuning when ``baseline``.

    Raises:
        DataError: an unknown mode, unlabelled data, models with different label sets.
    """
    if mode not in losses.UPDATE_MODES:
        raise DataError(f"unknown --mode {mode!r}; valid: {', '.join(losses.UPDATE_MODES)}")
    if train.labels is None:
        raise DataError(f"{train.name} has no labels; a compatible update trains on labels")
    if temperature <= 0 or weight < 0:
        raise DataError("need --temperature > 0 and --weight >= 0")
    roles = ("new model", "old model")
    order = label_order(new, old, roles)
    bar = progress or _no_bar
    fit, z_old, z_new0 = _targets(new, old, train, order, roles, eval_batch_size, bar, "targets")
    mask = losses.partition(z_old, z_new0, torch.from_numpy(fit.labels))

    def loss_fn(logits, labels, idx):
        i = torch.from_numpy(idx)
        if mode == "ce":
            return torch.nn.functional.cross_entropy(logits, labels)
        if mode == "muscle":
            return losses.muscle_loss(
                logits, z_old[i], z_new0[i], labels, mask[i], weight=weight,
                temperature=temperature,
            )  # fmt: skip
        return losses.fd_loss(
            logits, z_old[i], labels, alpha=fd_alpha, beta=fd_beta, weight=weight,
            temperature=temperature, divergence=mode.removeprefix("fd-"),
        )  # fmt: skip

    test, old_test, before = _targets(
        new, old, held_out, order, roles, eval_batch_size, bar, "before"
    )
    y, k = test.labels, int(old_test.shape[1])
    old_pred = old_test.argmax(1).numpy()

    def row(z) -> dict:
        f = flips(y, old_pred, z.argmax(1).numpy(), k)
        f.pop("per_class")
        return {"accuracy": float((z.argmax(1).numpy() == y).mean()), "flips": f}

    settings = dict(steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    report = {"mode": mode, "n": int(len(y)), "old_accuracy": float((old_pred == y).mean())}
    report["before"] = row(before)
    if baseline:
        saved = copy.deepcopy(new.module.state_dict())
        ce = lambda z, labels, idx: torch.nn.functional.cross_entropy(z, labels)  # noqa: E731
        _train(new, fit, ce, bar=bar, **settings)
        with bar("baseline", len(test), "examples") as hook:
            report["baseline"] = row(_logits(new, test, eval_batch_size, hook))
        new.module.load_state_dict(saved)
    run = _train(new, fit, loss_fn, bar=bar, **settings)
    with bar("after", len(test), "examples") as hook:
        report["after"] = row(_logits(new, test, eval_batch_size, hook))
    if baseline and report["baseline"]["flips"]["nfr"] > 0:
        base_nfr = report["baseline"]["flips"]["nfr"]
        report["nfr_reduction"] = 1.0 - report["after"]["flips"]["nfr"] / base_nfr
    report.update(
        settings={
            **settings, "temperature": temperature, "fd_alpha": fd_alpha, "fd_beta": fd_beta,
            "weight": weight,
        },
        old_taught=float(mask.double().mean()) if mode == "muscle" else None,
        loss_first=run[0], loss_last=run[-1], n_train=len(fit), held_out=test.name,
    )  # fmt: skip
    return report
