"""End-to-end checks: from model folders or predictions files to a `compare` report.

Label issues use out-of-sample probabilities of a model other than the two compared:

- array data (``X``: zoo tasks, ``.npz``/CSV inputs): a distance-weighted 10-nearest-
  neighbour classifier on the raw inputs, 5-fold cross-validated on the checked
  examples (`graft.check.labels.cross_val_probs`). On the zoo, logistic regression on
  the base backbone's features was tried first: it is right on only 77% of rot90-digit
  test images, and so flagged 14% of the (clean) labels;
- token data, or whenever ``label_probs`` is given: the probabilities in that file;
  without one, label issues are skipped with a note.
"""

from __future__ import annotations

import os

import numpy as np

from graft.check.calibration import softmax
from graft.check.compare import as_logits, compare
from graft.check.labels import cross_val_probs
from graft.check.predict import (
    Data,
    Split,
    as_labels,
    load_transformers_classifier,
    model_kind,
    read_data,
    transformers_logits,
    zoo_logits,
)
from graft.io import read_arrays
from graft.recipe import RecipeError
from graft.zoo.tasks import TASKS

_SCORE_KEYS = ("logits", "probs", "probabilities", "scores", "data")


def check_models(
    old: str | os.PathLike,
    new: str | os.PathLike,
    *,
    task: str | None = None,
    data: str | os.PathLike | None = None,
    zoo: str | os.PathLike = "graft-demo/zoo",
    label_probs: str | os.PathLike | None = None,
    find_issues: bool = True,
) -> dict:
    """Check model ``new`` against model ``old`` on a zoo task or on data (module doc).

    Raises:
        RecipeError: models of different kinds, a missing task or data, data that does
            not fit the models.
        GraftIOError: a model or data file cannot be read.
    """
    kinds = {model_kind(old), model_kind(new)}
    if len(kinds) > 1:
        raise RecipeError(f"{old} and {new} are different kinds of model; compare like with like")
    if data is not None and task is None and str(data) in TASKS and "zoo" in kinds:
        task, data = str(data), None  # --data may name a zoo task
    if kinds == {"zoo"}:
        z, head, d = _zoo_setup(old, task, data, zoo)
        scores = [[zoo_logits(m, head, s.inputs["X"]) for s in _splits(d)] for m in (old, new)]
    else:
        if data is None:
            raise RecipeError(
                "Hugging Face models need --data: a .npz of input_ids (+ attention_mask) and labels"
            )
        d = read_data(data)
        models = [load_transformers_classifier(m) for m in (old, new)]
        scores = [[transformers_logits(m, s.inputs) for s in _splits(d)] for m in models]
    for name, per_split in (("old", scores[0]), ("new", scores[1])):
        for s, z_ in zip(_splits(d), per_split, strict=True):
            if len(z_) != len(s):
                raise RecipeError(f"{name} model gave {len(z_)} scores for {len(s)} examples")
    report = _compare(scores, d, label_probs, find_issues)
    report["old"], report["new"], report["data"] = str(old), str(new), d.name
    return report


def _zoo_setup(old, task, data, zoo_root):
    from graft.models.digits_net import load_head
    from graft.zoo import load_zoo, task_data
    from graft.zoo.build import ZooError

    try:
        z = load_zoo(zoo_root)
    except ZooError as e:
        raise RecipeError(f"{e} (or point --zoo at it)") from e
    if task is None:
        task = next((t for t, p in z.finetuned.items() if _same(p, old)), None)
    if task is None:
        raise RecipeError(
            f"which task? pass --task (zoo tasks: {', '.join(z.heads)}); it picks the head "
            "both zoo models are run with"
        )
    if task not in z.heads:
        raise RecipeError(f"unknown task {task!r}; zoo tasks: {', '.join(z.heads)}")
    head = load_head(z.heads[task])
    if data is not None:
        return z, head, read_data(data)
    Xt, yt = task_data(task, "test", seed=z.seed)
    Xv, yv = task_data(task, "val", seed=z.seed)
    d = Data(
        f"zoo task {task} (test split; temperature fitted on the val split)",
        Split({"X": Xt.numpy()}, yt.numpy()),
        Split({"X": Xv.numpy()}, yv.numpy()),
    )
    return z, head, d


def _same(a, b) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _splits(d: Data) -> list[Split]:
    return [d.test] if d.val is None else [d.test, d.val]


def _compare(scores, d: Data, label_probs, find_issues: bool) -> dict:
    (old, *old_val), (new, *new_val) = scores
    val = (old_val[0], new_val[0], d.val.labels) if d.val is not None else None
    probs, note = _label_probs(d, label_probs, find_issues, old.shape[1])
    report = compare(old, new, d.test.labels, val=val, label_probs=probs)
    report["label_issue_source"] = note
    report["scores"] = "logits"
    return report


def _label_probs(d: Data, path, find_issues: bool, k: int) -> tuple[np.ndarray | None, str]:
    if path is not None:
        z, _ = as_logits(_scores_array(read_arrays(path), path), str(path))
        return softmax(z), f"probabilities from {path}"
    if not find_issues:
        return None, "skipped (--no-label-issues)"
    counts = np.bincount(d.test.labels, minlength=k)
    if (counts > 0).sum() < 2 or counts[counts > 0].min() < 2:
        return None, "skipped: needs at least two examples of each of two or more classes"
    if "X" in d.test.inputs:
        feats, what = d.test.inputs["X"], "5-fold cross-validated 10-NN on the raw inputs"
    else:
        return None, "skipped: token data; pass --label-probs with out-of-sample probabilities"
    probs = cross_val_probs(np.asarray(feats, dtype=np.float64), d.test.labels)
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
    zoo: str | os.PathLike = "graft-demo/zoo",
) -> dict:
    """Top-1 accuracy of one model on a zoo task or on data (as `check_models` runs it).

    Returns:
        ``{"accuracy", "n", "data"}``.
    """
    if model_kind(model) == "zoo":
        if data is not None and task is None and str(data) in TASKS:
            task, data = str(data), None
        _, head, d = _zoo_setup(model, task, data, zoo)
        z = zoo_logits(model, head, d.test.inputs["X"])
    else:
        if data is None:
            raise RecipeError("a Hugging Face model needs --data to measure its accuracy")
        d = read_data(data)
        z = transformers_logits(load_transformers_classifier(model), d.test.inputs)
    right = z.argmax(1) == d.test.labels
    return {"accuracy": float(right.mean()), "n": len(right), "data": d.name}
