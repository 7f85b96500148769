"""Small readers for the files `graft check` and `graft lint` take: arrays (.npz / .npy /
.csv), model cards, the raw bytes of pickles (never unpickled) and a model folder's files."""

from __future__ import annotations

import csv
import os
import zipfile
from pathlib import Path

import numpy as np
import yaml

from graft.io._errors import GraftIOError

ARRAY_SUFFIXES = (".npz", ".npy", ".csv")
# Files that may hold weights or pickles, as `graft lint` looks for them in a folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays stored in a ``.npz``, ``.npy`` or ``.csv`` file, by name.

    A ``.npz`` gives its keys; a ``.npy`` gives ``{"data": array}``; a CSV whose first row
    is not numeric gives one 1-D float array per column, named by that header row,
    otherwise ``{"data": (rows, columns) float array}``. Object arrays (pickles) are
    refused.

    Raises:
        GraftIOError: the file is missing, of another kind, unreadable or not numeric.
    """
    p = Path(path)
    if not p.is_file():
        raise GraftIOError(f"no such file: {p}")
    if p.suffix not in ARRAY_SUFFIXES:
        raise GraftIOError(f"{p} is not an array file; pass a .npz, .npy or .csv file")
    if p.suffix == ".csv":
        return _read_csv(p)
    try:
        if p.suffix == ".npy":
            return {"data": np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as loaded:  # a lazy archive
            return {k: np.asarray(loaded[k]) for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GraftIOError(
            f"cannot read {p}: {_one_line(e)}; save arrays with numpy.save / numpy.savez"
        ) from e


def read_dataset(path: str | os.PathLike) -> dict[str, dict[str, np.ndarray]]:
    """The arrays of a labelled data set by split: ``{"test": {...}, "val": {...}}``.

    ``path`` is a ``.npz``/``.csv`` file (its keys ending in ``_val`` form the ``val``
    split, the rest ``test``) or a folder holding ``test.npz`` or ``test.csv`` and
    optionally ``val.npz`` or ``val.csv``. What the arrays must be is up to the caller.

    Raises:
        GraftIOError: the path is missing, or a folder has no test file.
    """
    p = Path(path)
    if p.is_dir():
        splits = {}
        for split in ("test", "val"):
            found = [p / f"{split}{s}" for s in (".npz", ".csv") if (p / f"{split}{s}").is_file()]
            if found:
                splits[split] = read_arrays(found[0])
        if "test" not in splits:
            raise GraftIOError(
                f"no test.npz or test.csv in {p}; see `graft check --help` for the layout"
            )
        return splits
    arrays = read_arrays(p)
    val = {k[: -len("_val")]: v for k, v in arrays.items() if k.endswith("_val")}
    test = {k: v for k, v in arrays.items() if not k.endswith("_val")}
    return {"test": test, "val": val} if val else {"test": test}


def _read_csv(p: Path) -> dict[str, np.ndarray]:
    try:
        with p.open(newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as e:
        raise GraftIOError(f"cannot read {p}: {_one_line(e)}") from e
    if not rows:
        raise GraftIOError(f"{p} is empty; it needs one row per example")
    header = None if all(_is_number(c) for c in rows[0]) else [c.strip() for c in rows[0]]
    body = rows[1:] if header else rows
    width = len(rows[0])
    for i, row in enumerate(body, start=2 if header else 1):
        if len(row) != width or not all(_is_number(c) for c in row):
            raise GraftIOError(
                f"{p} line {i}: expected {width} numbers; CSV files must be numeric "
                "(with an optional header row)"
            )
    data = np.array([[float(c) for c in row] for row in body], dtype=np.float64).reshape(
        len(body), width
    )
    if header is None:
        return {"data": data}
    return {name: data[:, j] for j, name in enumerate(header)}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_model_card(path: str | os.PathLike) -> dict | None:
    """The YAML front matter of a model folder's ``README.md`` (or of a card file), or None
    when there is no card or it has no front matter.

    Raises:
        GraftIOError: the card exists but its front matter is not valid YAML.
    """
    p = Path(path)
    card = p / "README.md" if p.is_dir() else p
    if not card.is_file():
        return None
    try:
        text = card.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GraftIOError(f"cannot read {card}: {_one_line(e)}") from e
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        doc = yaml.safe_load(text[3:end])
    except yaml.YAMLError as e:
        raise GraftIOError(f"{card} has invalid YAML front matter: {_one_line(e)}") from e
    return doc if isinstance(doc, dict) else None


def read_pickle_streams(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    """The raw bytes of every pickle in a file, for scanning; nothing is unpickled.

    A zip-format torch file (``torch.save`` since 1.6) gives each ``*.pkl`` member (e.g.
    ``archive/data.pkl``); any other file is returned whole under its own name (a legacy
    torch file or a plain pickle: several pickles back to back, then raw storage bytes).

    Raises:
        GraftIOError: the file cannot be read.
    """
    p = Path(path)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                return [(f"{p.name}:{n}", z.read(n)) for n in z.namelist() if n.endswith(".pkl")]
        return [(p.name, p.read_bytes())]
    except (OSError, zipfile.BadZipFile, RuntimeError) as e:
        raise GraftIOError(f"cannot read {p}: {_one_line(e)}; check the file") from e


def model_files(path: str | os.PathLike) -> list[Path]:
    """The weight and pickle files of a model folder (sorted), or ``[path]`` for a file.

    Raises:
        GraftIOError: the path is missing.
    """
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise GraftIOError(f"no such file or directory: {p}")
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
