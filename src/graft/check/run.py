"""End-to-end checks: from model folders or predictions files to a `compare` report.

Models and data go through `graft.data` (`graft.check.predict`): any model `load_runner`
runs (Hugging Face folders with their classifier or a head, digits-zoo backbones with
the zoo's head of the task), on any data `read_data` reads.

Label issues use out-of-sample probabilities of a model other than the two compared:

- array data (``x``: digits-zoo tasks, ``.npz`` / numeric CSV inputs): a distance-weighted
  10-nearest-neighbour classifier on the raw inputs, 5-fold cross-validated on the
  checked examples (`graft.check.labels.cross_val_probs`). On the zoo, logistic
  regression on the base backbone's features was tried first: it is right on only 77% of
  rot90-digit test images, and so flagged 14% of the (clean) labels;
- text, token and image data: a standardised logistic regression on OLD's pooled
  features (the frozen backbone, not its head), 5-fold cross-validated: raw token ids
  have no useful distance;
- whenever ``label_probs`` is given: the probabilities in that file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np

from graft.check.calibration import softmax
from graft.check.compare import as_logits, compare
from graft.check.labels import cross_val_probs
from graft.check.predict import (
    CheckData,
    as_labels,
    label_order,
    load_checked,
    read_check_data,
)
from graft.data import DataOptions, Dataset, Runner, features, predict
from graft.io import read_arrays
from graft.recipe import RecipeError

_SCORE_KEYS = ("logits", "probs", "probabilities", "scores", "data")

# ``progress(label, total)`` gives a context whose value advances a bar by n examples
# (`graft.cli._progress.count_progress` fits).
ProgressFactory = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


def check_models(
    old: str | os.PathLike,
    new: str | os.PathLike,
    *,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    val_data: str | os.PathLike | None = None,
    zoo: str | os.PathLike | None = None,
    head: str | os.PathLike | None = None,
    old_head: str | os.PathLike | None = None,
    new_head: str | os.PathLike | None = None,
    options: DataOptions | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    batch_size: int = 32,
    label_probs: str | os.PathLike | None = None,
    find_issues: bool = True,
    progress: ProgressFactory | None = None,
) -> dict:
    """Check model ``new`` against model ``old`` on labelled data (module docstring).

    Args:
        task: a zoo task: its test split (unless ``data``), val split, and head.
        data: the checked examples (`graft.check.predict`); None with ``task`` None
            infers the task from OLD when OLD is one of the digits zoo's fine-tunes.
        val_data: a validation split for temperature scaling (default: the data's own).
        zoo: the zoo folder (default per task family, `graft.data.resolve`).
        head, old_head, new_head: the heads to run (``old_head``/``new_head`` win).
        options: columns and limit of the data files.
        pooling, max_length: how text is run (`graft.data.load_runner`).
        label_probs: out-of-sample probabilities (N, K) for label issues.
        find_issues: look for label issues at all.
        progress: a progress-bar factory (see `ProgressFactory`).

    Raises:
        RecipeError: models of different kinds or label sets, data that does not fit them.
        GraftIOError: a model or data file cannot be read.
    """
    if data is None:
        task = task or _infer_task(old, zoo)
        data = f"task:{task}"
    d = read_check_data(
        str(data), val_spec=None if val_data is None else str(val_data), options=options, zoo=zoo
    )
    task = task or d.test.task
    runners = [
        load_checked(m, head=h or head, task=task, zoo=zoo, pooling=pooling, max_length=max_length)
        for m, h in ((old, old_head), (new, new_head))
    ]
    if runners[0].kind != runners[1].kind:
        raise RecipeError(
            f"{old} is a {runners[0].kind} model and {new} a {runners[1].kind} one; "
            "compare like with like"
        )
    order, notes = label_order(*runners)
    wants_features = find_issues and label_probs is None and d.test.kind != "array"
    total = 2 * len(d.test) + (2 * len(d.val) if d.val is not None else 0)
    total += len(d.test) if wants_features else 0
    bar = progress or (lambda label, n: nullcontext(None))
    with bar(f"check {Path(old).name} -> {Path(new).name}", total) as hook:
        test_y, test_scores = _scores(runners, d.test, order, batch_size, hook)
        val = None
        if d.val is not None:
            val_y, (old_val, new_val) = _scores(runners, d.val, order, batch_size, hook)
            val = (old_val, new_val, val_y)
        k = test_scores[0].shape[1]
        probs, source = _label_probs(
            d, runners[0], test_y, k, label_probs, find_issues, batch_size, hook
        )
    report = compare(*test_scores, test_y, val=val, label_probs=probs)
    report["label_issue_source"] = source
    report["scores"] = "logits"
    report["old"], report["new"], report["data"] = str(old), str(new), d.test.name
    report["val_data"] = d.val.name if d.val is not None else None
    report["heads"] = {"old": runners[0].head_source, "new": runners[1].head_source}
    names = runners[0].label_names or runners[1].label_names
    report["label_names"] = list(names) if names is not None else None
    report["notes"] = notes
    return report


def _infer_task(old, zoo) -> str:
    """The digits-zoo task OLD was fine-tuned on (the zoo manifest's ``finetuned``)."""
    from graft.data.resolve import DEFAULT_ZOOS
    from graft.zoo import load_zoo
    from graft.zoo.build import ZooError

    root = Path(zoo) if zoo is not None else DEFAULT_ZOOS["digits"]
    try:
        z = load_zoo(root)
    except ZooError:
        z = None
    task = None if z is None else next((t for t, p in z.finetuned.items() if _same(p, old)), None)
    if task is None:
        raise RecipeError(
            "which data? pass --data FILE (or --task NAME for a zoo task); the task is only "
            f"inferred when OLD is one of the fine-tunes of the zoo in {root} (--zoo)"
        )
    return task


def _same(a, b) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _scores(
    runners: list[Runner], data: Dataset, order, batch_size: int, hook
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Labels (in OLD's ids, or NEW's when only NEW names its labels) and both models'
    logits with NEW's columns in that order."""
    fitted = [r.prepare(data) for r in runners]
    ref = 0 if runners[0].label_names is not None or runners[1].label_names is None else 1
    old, new = (
        predict(r, f, batch_size=batch_size, progress=hook)
        for r, f in zip(runners, fitted, strict=True)
    )
    if order is not None:
        new = new[:, order]
    return fitted[ref].labels, (old, new)


def _label_probs(
    d: CheckData,
    runner: Runner,
    y: np.ndarray,
    k: int,
    path,
    find_issues: bool,
    batch_size: int,
    hook,
) -> tuple[np.ndarray | None, str]:
    if path is not None:
        z, _ = as_logits(_scores_array(read_arrays(path), path), str(path))
        return softmax(z), f"probabilities from {path}"
    if not find_issues:
        return None, "skipped (--no-label-issues)"
    counts = np.bincount(y, minlength=k)
    if (counts > 0).sum() < 2 or counts[counts > 0].min() < 2:
        if d.test.kind != "array" and hook is not None:
            hook(len(y))  # the features pass counted in the bar does not run
        return None, "skipped: needs at least two examples of each of two or more classes"
    if d.test.kind == "array":
        feats, model = d.test.x, "knn"
        what = "5-fold cross-validated 10-NN on the raw inputs"
    else:
        feats = features(runner, d.test, batch_size=batch_size, progress=hook).numpy()
        model = "logistic"
        what = (
            f"5-fold cross-validated logistic regression on OLD's {runner.pooling}-pooled features"
        )
    probs = cross_val_probs(np.asarray(feats, dtype=np.float64), y, model=model)
    full = np.zeros((len(probs), k))
    full[:, : probs.shape[1]] = probs
    return full, what


def check_predictions(
    old_preds: str | os.PathLike,
    new_preds: str | os.PathLike,
    labels: str | os.PathLike,
    *,
    val: tuple[str | os.PathLike, str | os.PathLike, str | os.PathLike] | None = None,
    label_probs: str | os.PathLike | None = None,
    kind: str = "auto",
) -> dict:
    """Check from predictions files: scores (N, K) of each model and labels (N,).

    Scores are a ``.npy``, a ``.csv`` (one row per example) or a ``.npz`` whose array is
    named ``logits``, ``probs``/``probabilities`` or ``scores`` (or is its only array);
    ``kind`` is ``auto``, ``logits`` or ``probabilities``.
    """
    old, old_kind = _read_scores(old_preds, kind)
    new, new_kind = _read_scores(new_preds, kind)
    y = _read_labels(labels)
    val_scores = None
    if val is not None:
        val_scores = (
            _read_scores(val[0], kind)[0],
            _read_scores(val[1], kind)[0],
            _read_labels(val[2]),
        )
    probs = None
    if label_probs is not None:
        z, _ = as_logits(_scores_array(read_arrays(label_probs), label_probs), str(label_probs))
        probs = softmax(z)
    report = compare(old, new, y, val=val_scores, label_probs=probs)
    report["old"], report["new"], report["data"] = str(old_preds), str(new_preds), str(labels)
    report["scores"] = {"old": old_kind, "new": new_kind}
    report["label_issue_source"] = (
        f"probabilities from {label_probs}"
        if label_probs is not None
        else "skipped: pass --label-probs with out-of-sample probabilities of a third model"
    )
    return report


def _read_scores(path, kind: str) -> tuple[np.ndarray, str]:
    arrays = read_arrays(path)
    if kind == "auto" and ("probs" in arrays or "probabilities" in arrays):
        kind = "probabilities"
    elif kind == "auto" and "logits" in arrays:
        kind = "logits"
    return as_logits(_scores_array(arrays, path), str(path), kind=kind)


def _scores_array(arrays: dict[str, np.ndarray], path) -> np.ndarray:
    key = next((k for k in _SCORE_KEYS if k in arrays), None)
    if key is None and len(arrays) > 1:  # a CSV with a header: one column per class
        if all(v.ndim == 1 for v in arrays.values()):
            return np.stack(list(arrays.values()), axis=1)
        raise RecipeError(
            f"{path} holds {', '.join(arrays)}; name the scores array logits or probs"
        )
    return arrays[key] if key else next(iter(arrays.values()))


def _read_labels(path) -> np.ndarray:
    arrays = read_arrays(path)
    key = next((k for k in ("y", "labels", "label", "data") if k in arrays), None)
    if key is None:
        if len(arrays) != 1:
            raise RecipeError(
                f"{path} holds {', '.join(arrays)}; name the labels array y or labels"
            )
        key = next(iter(arrays))
    return as_labels(arrays[key], str(path))


def measure_accuracy(
    model: str | os.PathLike,
    *,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    zoo: str | os.PathLike | None = None,
) -> dict:
    """Top-1 accuracy of one model on a zoo task or on data (as `check_models` runs it).

    Returns:
        ``{"accuracy", "n", "data"}``.
    """
    if data is None:
        task = task or _infer_task(model, zoo)
        data = f"task:{task}"
    test = read_check_data(str(data), zoo=zoo, with_val=False).test
    runner = load_checked(model, head=None, task=task or test.task, zoo=zoo)
    test = runner.prepare(test)
    right = predict(runner, test).argmax(1) == test.labels
    return {"accuracy": float(right.mean()), "n": len(right), "data": test.name}
