"""The two models `graft check` compares, run over the same data (`graft.data`).

Data (``--data``): anything `graft.data.read_data` reads (CSV / TSV / JSONL text, numeric
CSV, ``.npz`` arrays or tokens, image folders, ``task:NAME``), plus two layouts that carry
a validation split for temperature scaling:

- a ``.npz`` whose keys with a ``_val`` suffix (``X_val``, ``input_ids_val``, ``y_val``...)
  form the validation split;
- a folder holding ``test.<ext>`` and optionally ``val.<ext>`` (``.npz``, ``.csv``,
  ``.tsv``, ``.jsonl``).

A zoo task's validation split is its ``val`` split; ``--val-data`` names one explicitly.

Heads: ``--head`` (both models), ``--old-head`` / ``--new-head``; else, for zoo-task data
(or ``--task``), the zoo's fine-tuned head of that task; else each model's own classifier
or ``head.safetensors``. Labels are mapped to each head's ids through its label list
(`Runner.prepare`); NEW's logit columns are then put in OLD's label order, so both
models' predictions and the labels share one mapping.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graft.data import (
    DataError,
    DataOptions,
    Dataset,
    Runner,
    encode_labels,
    load_runner,
    read_data,
)
from graft.data.resolve import default_zoo, zoo_head
from graft.io import read_arrays
from graft.recipe import RecipeError

_LABEL_KEYS = ("y", "labels", "label", "targets")
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_INPUT_KEYS = ("x", "X", "inputs", "images")
_LAYOUT_SUFFIXES = (".npz", ".csv", ".tsv", ".jsonl")


@dataclass
class CheckData:
    """The checked examples and, when there is one, a validation split."""

    test: Dataset
    val: Dataset | None = None


def read_check_data(
    spec: str,
    *,
    val_spec: str | None = None,
    options: DataOptions | None = None,
    zoo: str | os.PathLike | None = None,
    with_val: bool = True,
) -> CheckData:
    """The test split of ``spec`` and (``with_val``) its validation split (module doc).

    Raises:
        DataError: the data (or the validation data) cannot be read or used.
    """
    zoo_root = default_zoo(spec, zoo)
    path = Path(spec)
    if path.is_dir() and _layout_file(path, "test") is not None:
        spec = str(_layout_file(path, "test"))
        if val_spec is None and _layout_file(path, "val") is not None:
            val_spec = str(_layout_file(path, "val"))
    test = read_data(spec, options, zoo=zoo_root, split="test")
    if not with_val:
        val = None
    elif val_spec is not None:
        val = read_data(val_spec, options, zoo=default_zoo(val_spec, zoo), split="val")
    elif test.task is not None:
        val = read_data(spec, options, zoo=zoo_root, split="val")
    elif path.suffix.lower() == ".npz":
        val = _npz_val(path, options or DataOptions())
    else:
        val = None
    return CheckData(test, val)


def _layout_file(folder: Path, split: str) -> Path | None:
    return next(
        (folder / f"{split}{s}" for s in _LAYOUT_SUFFIXES if (folder / f"{split}{s}").is_file()),
        None,
    )


def _npz_val(path: Path, opts: DataOptions) -> Dataset | None:
    """The ``_val`` keys of a ``.npz`` as a data set (None when it has none)."""
    arrays = {k[: -len("_val")]: v for k, v in read_arrays(path).items() if k.endswith("_val")}
    if not arrays:
        return None
    name = f"{path} (_val keys)"
    label_key = next((k for k in (opts.label_column, *_LABEL_KEYS) if k in arrays), None)
    if label_key is None:
        raise DataError(f"{name} has no labels; name them y_val (or labels_val)")
    y = np.asarray(arrays[label_key]).reshape(len(arrays[label_key]), -1)
    if y.shape[1] != 1:
        raise DataError(f"{name}: labels {label_key!r} must be 1-D (N,), got shape {y.shape}")
    labels, names = encode_labels(
        [v.item() for v in y[:, 0]], where=[f"{name} example {i}" for i in range(len(y))]
    )
    if "input_ids" in arrays:
        tokens = {k: np.asarray(arrays[k]).astype(np.int64) for k in _TOKEN_KEYS if k in arrays}
        inputs: dict = {"tokens": tokens}
        rows = {k: len(v) for k, v in tokens.items()}
    else:
        key = next((k for k in _INPUT_KEYS if k in arrays), None)
        if key is None:
            raise DataError(f"{name} has labels but no inputs; add X_val (or input_ids_val)")
        x = np.asarray(arrays[key], dtype=np.float32)
        inputs, rows = {"x": x}, {key: len(x)}
    for k, n in rows.items():
        if n != len(labels):
            raise DataError(f"{name}: {k} has {n} rows but there are {len(labels)} labels")
    data = Dataset(name, labels, names, **inputs)
    return data if opts.limit is None else data.subset(np.arange(min(opts.limit, len(data))))


def task_head(task: str | None, zoo: str | os.PathLike | None) -> Path | None:
    """The zoo's fine-tuned head of ``task`` (None without a task or a zoo head)."""
    if task is None:
        return None
    return zoo_head(default_zoo(f"task:{task}", zoo), task)


def load_checked(
    model: str | os.PathLike,
    *,
    head: str | os.PathLike | None,
    task: str | None,
    zoo: str | os.PathLike | None,
    pooling: str | None = None,
    max_length: int | None = None,
) -> Runner:
    """A model with a classification head: ``head``, else the zoo's head of ``task`` (as
    `graft.data.open_model_data` picks it), else the model's own.

    Raises:
        DataError: the model cannot be run, or no head is found (the message says where
            graft looked and how to give one).
    """
    if head is None:
        head = task_head(task, zoo)
    runner = load_runner(model, head=head, pooling=pooling, max_length=max_length)
    if runner.has_head:
        return runner
    where = ""
    if task is not None:
        zoo_root = default_zoo(f"task:{task}", zoo)
        where = f" and {zoo_root} keeps no head for task {task} (point --zoo at the zoo)"
    raise DataError(
        f"{model} has no classification head{where}; pass --head (a head file, or a "
        "sequence-classification model folder whose classifier to use)"
    )


def label_order(old: Runner, new: Runner) -> tuple[np.ndarray | None, list[str]]:
    """The column order that puts NEW's logits in OLD's label order (None: already), and
    notes.

    Raises:
        DataError: the heads score different classes.
    """
    a, b = old.label_names, new.label_names
    if old.num_classes != new.num_classes:
        raise DataError(
            f"OLD's head ({old.head_source}) has {old.num_classes} classes, NEW's "
            f"({new.head_source}) {new.num_classes}; compare models with the same label set "
            "(or pass --old-head / --new-head)"
        )
    if a is None or b is None:
        if a is None and b is None:
            return None, []
        unnamed = "OLD" if a is None else "NEW"
        return None, [
            f"{unnamed}'s head has no label names; its outputs are read in the other head's "
            "label order"
        ]
    if a == b:
        return None, []
    if set(a) != set(b):
        only_old = sorted(set(a) - set(b))[:5]
        only_new = sorted(set(b) - set(a))[:5]
        raise DataError(
            f"OLD's head ({old.head_source}) and NEW's ({new.head_source}) have different "
            f"labels (only OLD: {', '.join(only_old)}; only NEW: {', '.join(only_new)}); "
            "compare models with the same label set (or pass --old-head / --new-head)"
        )
    index = {name: i for i, name in enumerate(b)}
    return np.array([index[name] for name in a]), [
        "NEW's head lists the labels in another order; its logits were reordered to OLD's"
    ]


def as_labels(y: np.ndarray, where: str) -> np.ndarray:
    """Integer class labels (N,) from an array of whole numbers ≥ 0 (predictions files).

    Raises:
        RecipeError: not 1-D (or (N, 1)), empty, not whole numbers, or negative.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise RecipeError(f"labels in {where} must be one integer per example; got shape {y.shape}")
    if len(y) == 0:
        raise RecipeError(f"{where} holds no examples; check needs at least one labelled example")
    if y.dtype.kind not in "iuf" or not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
        raise RecipeError(f"labels in {where} must be whole numbers (class indices)")
    if y.min() < 0:
        raise RecipeError(f"labels in {where} must be class indices >= 0; found {int(y.min())}")
    return y.astype(np.int64)
