"""The user's labelled (or unlabelled) data, as one `Dataset` whatever the file format.

Formats, one reader each (`read_data` picks by the path):

* **text tables** — ``.csv``, ``.tsv``, ``.jsonl`` (``.ndjson``): the text in
  ``text_column`` (default ``text``), an optional second text in ``text_pair_column``
  (sentence pairs), the label in ``label_column`` (default ``label``). A CSV with no text
  column whose cells are all numbers is read as **numeric features** instead (every
  column but the label is one input feature).
* **arrays** — ``.npz`` with inputs ``x`` (also ``X``, ``inputs``, ``images``) or
  pre-tokenized ``input_ids`` (+ ``attention_mask``, ``token_type_ids``), and labels
  ``y`` (also ``labels``, ``label``, ``targets``).
* **image folders** — ``root/<class name>/<image>.png``: the class is the folder name;
  images are decoded per batch by the model's runner (bounded memory).
* **zoo tasks** — ``task:NAME`` (or a bare task name that is not a path): a split of one of
  graft's built-in zoo tasks (digits or text).

Labels of any type become ids in sorted order (`graft.data.labels`); the id -> name list
travels with the data set so a head's own list can re-map it. ``labels`` is None for
unlabelled data (AdaMerging's inputs), which ``require_labels=False`` allows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from graft.data.labels import DataError, canonical_label, encode_labels, remap
from graft.io import GraftIOError, read_arrays
from graft.io._tables import image_folder_files, is_table_file, read_table

_INPUT_KEYS = ("x", "X", "inputs", "images")
_LABEL_KEYS = ("y", "labels", "label", "targets")
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass(frozen=True)
class DataOptions:
    """How to read a data file.

    Attributes:
        text_column: the column holding the text (tables).
        text_pair_column: the column holding a second text, for sentence-pair tasks.
        label_column: the column holding the label (tables); for arrays, tried first.
        limit: read at most this many examples (None: all).
        require_labels: refuse data without labels.
    """

    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    limit: int | None = None
    require_labels: bool = True


@dataclass(frozen=True)
class Dataset:
    """Examples of one kind (texts, arrays, tokens or image files) and their labels.

    Attributes:
        name: how messages name the data (the file, or ``task NAME (split)``).
        labels: int64 ids (N,) into ``label_names``, or None when unlabelled.
        label_names: id -> label name.
        texts / pairs: the texts (and second texts) of a text data set.
        x: float32 inputs (N, ...) of an array data set.
        tokens: pre-tokenized int64 arrays (N, L) by name (``input_ids``...).
        images: image files of an image-folder data set.
        task: the zoo task the data comes from, if any (heads are looked up by it).
    """

    name: str
    labels: np.ndarray | None
    label_names: tuple[str, ...] = ()
    texts: list[str] | None = None
    pairs: list[str] | None = None
    x: np.ndarray | None = None
    tokens: dict[str, np.ndarray] | None = None
    images: list[Path] | None = None
    task: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``"text"``, ``"array"``, ``"tokens"`` or ``"image"``."""
        if self.texts is not None:
            return "text"
        if self.x is not None:
            return "array"
        if self.tokens is not None:
            return "tokens"
        return "image"

    def __len__(self) -> int:
        for part in (self.texts, self.x, self.images):
            if part is not None:
                return len(part)
        return len(next(iter(self.tokens.values()))) if self.tokens else 0

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def subset(self, index: Sequence[int] | np.ndarray) -> Dataset:
        """The examples at ``index``, in that order."""
        idx = np.asarray(index, dtype=np.int64)

        def pick(seq):
            return None if seq is None else [seq[i] for i in idx]

        return replace(
            self,
            labels=None if self.labels is None else self.labels[idx],
            texts=pick(self.texts),
            pairs=pick(self.pairs),
            x=None if self.x is None else self.x[idx],
            tokens=None if self.tokens is None else {k: v[idx] for k, v in self.tokens.items()},
            images=pick(self.images),
        )

    def relabel(self, known: Sequence[str]) -> Dataset:
        """The same examples with ids into ``known`` (a head's label list).

        Raises:
            DataError: a label of the data is not in ``known``.
        """
        known = tuple(known)
        if self.labels is None or known == self.label_names:
            return replace(self, label_names=known)
        return replace(
            self, labels=remap(self.labels, self.label_names, known, self.name), label_names=known
        )


def read_data(
    spec: str | os.PathLike,
    options: DataOptions | None = None,
    *,
    zoo: str | os.PathLike | None = None,
    split: str = "test",
) -> Dataset:
    """Read a data set from a file, a folder or a zoo task (module docstring).

    Args:
        spec: the path, or ``task:NAME``.
        options: columns, limit, whether labels are required.
        zoo: the zoo folder for ``task:NAME`` specs.
        split: the split of a zoo task.

    Raises:
        DataError: the data cannot be used (names the file, row or column, and the fix).
        GraftIOError: the file cannot be read.
    """
    opts = options or DataOptions()
    text = str(spec)
    path = Path(text)
    if text.startswith("task:") or (not path.exists() and _is_task_name(text)):
        from graft.data.zoo_tasks import zoo_task_data

        data = zoo_task_data(text.removeprefix("task:"), split=split, zoo=zoo)
    elif not path.exists():
        raise DataError(
            f"no such data file or folder: {path}; pass a .csv/.tsv/.jsonl/.npz file, an image "
            "folder, or task:NAME for a zoo task"
        )
    elif path.is_dir():
        data = _read_image_folder(path)
    elif is_table_file(path):
        data = _read_table(path, opts)
    elif path.suffix.lower() in (".npz", ".npy"):
        data = _read_npz(path, opts)
    else:
        raise DataError(
            f"cannot read data {path}: pass a .csv, .tsv, .jsonl or .npz file, an image "
            "folder (<class>/<image>.png), or task:NAME"
        )
    if opts.limit is not None and len(data) > opts.limit:
        data = data.subset(np.arange(opts.limit))
    if opts.require_labels and data.labels is None:
        raise DataError(
            f"{data.name} has no labels; add a '{opts.label_column}' column "
            "(or pass --label-column)"
        )
    if len(data) == 0:
        raise DataError(f"{data.name} holds no examples")
    return data


def _is_task_name(text: str) -> bool:
    from graft.data.zoo_tasks import all_task_names

    return text in all_task_names()


def _read_table(path: Path, opts: DataOptions) -> Dataset:
    table = read_table(path, max_rows=opts.limit)
    where = [f"{path} line {n}" for n in table.lines]
    if opts.text_column not in table.columns:
        numeric = _numeric_table(table, opts, where)
        if numeric is not None:
            return numeric
        fix = "pass --text-column NAME"
        if len(table.columns) == 1 and "\t" in table.columns[0]:
            fix = "its header holds tabs: a tab-separated file is read as such when named .tsv"
        raise DataError(
            f"{path} has no column {opts.text_column!r} (columns: "
            f"{', '.join(table.columns[:12])}); {fix}"
        )
    if opts.text_pair_column is not None and opts.text_pair_column not in table.columns:
        raise DataError(
            f"{path} has no column {opts.text_pair_column!r} for --text-pair-column "
            f"(columns: {', '.join(table.columns[:12])})"
        )
    texts = _text_column(table.rows, opts.text_column, where)
    pairs = (
        _text_column(table.rows, opts.text_pair_column, where) if opts.text_pair_column else None
    )
    labels, names = _labels(table, opts, where)
    return Dataset(str(path), labels, names, texts=texts, pairs=pairs)


def _text_column(rows: list[dict], column: str, where: list[str]) -> list[str]:
    out = []
    for row, place in zip(rows, where, strict=True):
        value = row.get(column)
        if isinstance(value, bool) or value is None:
            raise DataError(f"{place}: column {column!r} is empty; give every example a text")
        if isinstance(value, int | float):
            value = str(value)
        if not isinstance(value, str):
            raise DataError(
                f"{place}: column {column!r} holds a {type(value).__name__}, not a text"
            )
        out.append(value)
    return out


def _labels(table, opts: DataOptions, where: list[str]) -> tuple[np.ndarray | None, tuple]:
    if opts.label_column not in table.columns:
        if opts.require_labels:
            raise DataError(
                f"{table.path} has no column {opts.label_column!r} (columns: "
                f"{', '.join(table.columns[:12])}); pass --label-column NAME"
            )
        return None, ()
    values = [row.get(opts.label_column) for row in table.rows]
    return encode_labels(values, where=[f"{w}, column {opts.label_column!r}" for w in where])


def _numeric_table(table, opts: DataOptions, where: list[str]) -> Dataset | None:
    """A CSV of numbers only: the label column plus one column per input feature."""
    label_col = (
        opts.label_column
        if opts.label_column in table.columns
        else next((c for c in _LABEL_KEYS if c in table.columns), None)
    )
    features = [c for c in table.columns if c != label_col]
    if not features:
        return None
    x = np.empty((len(table.rows), len(features)), dtype=np.float32)
    for i, row in enumerate(table.rows):
        for j, c in enumerate(features):
            try:
                x[i, j] = float(row.get(c))  # type: ignore[arg-type]
            except (TypeError, ValueError):
                return None  # not a numeric table: the caller names the missing text column
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataError(f"{where[bad]}: a feature is NaN or infinite; fix or drop the row")
    if label_col is None:
        return Dataset(str(table.path), None, (), x=x)
    values = [row.get(label_col) for row in table.rows]
    labels, names = encode_labels(values, where=[f"{w}, column {label_col!r}" for w in where])
    return Dataset(str(table.path), labels, names, x=x)


def _read_npz(path: Path, opts: DataOptions) -> Dataset:
    arrays = read_arrays(path)
    label_key = next((k for k in (opts.label_column, *_LABEL_KEYS) if k in arrays), None)
    labels, names = (None, ())
    n = None
    if label_key is not None:
        y = np.asarray(arrays[label_key])
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"{path}: labels {label_key!r} must be 1-D (N,), got shape {y.shape}")
        if y.dtype.kind not in "biufUS":
            raise DataError(
                f"{path}: labels {label_key!r} have dtype {y.dtype}; store numbers or strings"
            )
        values = [v.item() if hasattr(v, "item") else v for v in y]
        labels, names = encode_labels(values, where=[f"{path} example {i}" for i in range(len(y))])
        n = len(y)
    if "input_ids" in arrays:
        tokens = {}
        for k in _TOKEN_KEYS:
            if k not in arrays:
                continue
            v = np.asarray(arrays[k])
            whole = v.dtype.kind in "iub" or (
                v.dtype.kind == "f"
                and bool(np.isfinite(v).all())
                and bool((v == np.round(v)).all())
            )
            if v.ndim != 2 or not whole:
                raise DataError(
                    f"{path}: {k} must be whole numbers of shape (N, L), got {v.dtype} of "
                    f"shape {v.shape}; store token ids as int64 rows"
                )
            if v.size and int(v.min()) < 0:
                raise DataError(f"{path}: {k} holds negative ids ({int(v.min())})")
            tokens[k] = v.astype(np.int64)
        shapes = {v.shape for v in tokens.values()}
        if len(shapes) > 1:
            raise DataError(f"{path}: {', '.join(tokens)} differ in shape ({sorted(shapes)})")
        _check_rows(path, tokens, n)
        return Dataset(str(path), labels, names, tokens=tokens)
    key = next((k for k in _INPUT_KEYS if k in arrays), None)
    if key is None:
        raise DataError(
            f"{path} has no inputs: name them x (or {', '.join(_INPUT_KEYS[1:])}) or input_ids "
            f"(found: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    x = np.asarray(arrays[key])
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: inputs {key!r} have dtype {x.dtype}; store numbers")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: inputs {key!r} contain NaN or infinite values")
    _check_rows(path, {key: x}, n)
    return Dataset(str(path), labels, names, x=x)


def _check_rows(path: Path, arrays: dict[str, np.ndarray], n: int | None) -> None:
    for k, v in arrays.items():
        if v.ndim < 1:
            raise DataError(f"{path}: {k} is a scalar; store one row per example")
        if n is not None and len(v) != n:
            raise DataError(f"{path}: {k} has {len(v)} rows but there are {n} labels")


def _read_image_folder(path: Path) -> Dataset:
    try:
        classes = image_folder_files(path)
    except GraftIOError as e:
        raise DataError(str(e)) from None
    files, values = [], []
    for name, paths in classes.items():
        files += paths
        values += [name] * len(paths)
    labels, names = encode_labels(values, where=[str(f) for f in files])
    return Dataset(str(path), labels, names, images=files)


__all__ = ["DataError", "DataOptions", "Dataset", "canonical_label", "read_data"]
