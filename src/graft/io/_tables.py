"""Readers for the user's labelled data files: text tables (CSV / TSV / JSONL) and image
folders. They parse with limits and return plain Python rows; turning rows into a data
set (columns, label ids, tokens) is `graft.data`'s job.

Limits (a hostile or broken file ends in a one-line `GraftIOError`, never a traceback):

* a CSV/TSV field may hold at most ``MAX_FIELD_CHARS`` characters and a JSONL line at
  most ``MAX_LINE_BYTES`` bytes; JSON nested deeper than Python's parser allows is refused;
* at most ``max_rows`` rows are read when the caller asks for fewer (``--limit``);
* image files larger than ``MAX_IMAGE_BYTES`` or ``MAX_IMAGE_PIXELS`` are refused before
  they are decoded.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graft.io._errors import GraftIOError

TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".ndjson": None, ".json": None}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_FIELD_CHARS = 1_000_000
MAX_LINE_BYTES = 10_000_000
MAX_IMAGE_BYTES = 50_000_000
MAX_IMAGE_PIXELS = 50_000_000


@dataclass(frozen=True)
class Table:
    """The rows of a text table.

    Attributes:
        path: the file.
        columns: column names (a CSV's header row; the union of JSONL keys, in first-seen
            order).
        rows: one dict per example, column -> value (a str for CSV/TSV; any JSON scalar
            for JSONL; a column a row lacks is absent from its dict).
        lines: the 1-based line number of each row in the file, for error messages.
    """

    path: Path
    columns: list[str]
    rows: list[dict[str, object]]
    lines: list[int]


def is_table_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in TEXT_SUFFIXES


def read_table(path: str | os.PathLike, *, max_rows: int | None = None) -> Table:
    """The rows of a ``.csv``, ``.tsv`` or ``.jsonl`` (also ``.ndjson``; ``.json`` when it
    holds one object per line) file.

    CSV and TSV files need a header row naming the columns; blank lines are skipped.

    Raises:
        GraftIOError: the file is missing, not UTF-8, malformed (the message names the line),
            over a limit, or holds no rows.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise GraftIOError(
            f"{p} is not a text table; pass a .csv, .tsv or .jsonl file "
            "(or an image folder, or a .npz)"
        )
    if not p.is_file():
        raise GraftIOError(f"no such data file: {p}")
    try:
        with p.open("rb") as f:
            if TEXT_SUFFIXES[suffix] is None:
                table = _read_jsonl(p, f, max_rows)
            else:
                table = _read_delimited(p, f, TEXT_SUFFIXES[suffix], max_rows)
    except OSError as e:
        raise GraftIOError(f"cannot read {p}: {e.strerror or e}") from e
    if not table.rows:
        raise GraftIOError(f"{p} holds no examples; it needs a header row and one row per example")
    return table


def _read_delimited(p: Path, f, delimiter: str, max_rows: int | None) -> Table:
    text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
    previous = csv.field_size_limit(MAX_FIELD_CHARS)
    try:
        reader = csv.reader(text, delimiter=delimiter)
        header: list[str] | None = None
        rows: list[dict[str, object]] = []
        lines: list[int] = []
        for record in reader:
            if not any(c.strip() for c in record):
                continue
            if header is None:
                header = [c.strip() for c in record]
                _check_header(p, header)
                continue
            if len(record) != len(header):
                raise GraftIOError(
                    f"{p} line {reader.line_num}: {len(record)} fields, the header has "
                    f"{len(header)}; quote fields that contain the delimiter"
                )
            rows.append(dict(zip(header, record, strict=True)))
            lines.append(reader.line_num)
            if max_rows is not None and len(rows) >= max_rows:
                break
    except csv.Error as e:
        raise GraftIOError(f"{p} line {reader.line_num}: {e}; fix the file's quoting") from e
    except UnicodeDecodeError as e:
        raise GraftIOError(f"{p} is not UTF-8 text ({e.reason}); save it as UTF-8") from e
    finally:
        csv.field_size_limit(previous)
    return Table(p, header or [], rows, lines)


def _check_header(p: Path, header: list[str]) -> None:
    if any(not c for c in header):
        raise GraftIOError(
            f"{p} line 1: the header row has an empty column name; name every column"
        )
    seen = set()
    for c in header:
        if c in seen:
            raise GraftIOError(f"{p} line 1: column {c!r} appears twice in the header; rename one")
        seen.add(c)


def _read_jsonl(p: Path, f, max_rows: int | None) -> Table:
    columns: dict[str, None] = {}
    rows: list[dict[str, object]] = []
    lines: list[int] = []
    for number, raw in enumerate(_limited_lines(p, f), start=1):
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise GraftIOError(f"{p} line {number}: JSON nested too deeply; flatten it") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise GraftIOError(
                f"{p} line {number}: not a JSON object ({str(e)[:80]}); "
                "write one JSON object per line"
            ) from None
        if not isinstance(doc, dict):
            raise GraftIOError(
                f"{p} line {number}: a JSON {type(doc).__name__}, not an object; "
                "write one JSON object per line"
            )
        for key in doc:
            columns.setdefault(key)
        rows.append(doc)
        lines.append(number)
        if max_rows is not None and len(rows) >= max_rows:
            break
    return Table(p, list(columns), rows, lines)


def _limited_lines(p: Path, f):
    number = 0
    while True:
        line = f.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise GraftIOError(
                f"{p} line {number} is longer than {MAX_LINE_BYTES:,} bytes; split the file"
            )
        yield line


def image_folder_files(path: str | os.PathLike) -> dict[str, list[Path]]:
    """The image files of a ``class_name/*.png`` folder, by class folder name (sorted).

    Hidden entries and files of other kinds are ignored; symbolic links are not followed
    out of the folder.

    Raises:
        GraftIOError: not a folder, or no class folder holds an image.
    """
    root = Path(path)
    if not root.is_dir():
        raise GraftIOError(f"no such image folder: {root}")
    real_root = root.resolve()
    out: dict[str, list[Path]] = {}
    for d in sorted(root.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        files = [
            f
            for f in sorted(d.iterdir())
            if f.suffix.lower() in IMAGE_SUFFIXES
            and not f.name.startswith(".")
            and f.is_file()
            and f.resolve().is_relative_to(real_root)
        ]
        if files:
            out[d.name] = files
    if not out:
        raise GraftIOError(
            f"{root} has no class folders with images; lay it out as {root}/<class>/<image>.png"
        )
    return out


def read_image(path: Path, *, mode: str = "L", size: tuple[int, int] | None = None) -> np.ndarray:
    """One image as float32 in [0, 1]: (H, W) for mode ``"L"``, (H, W, 3) for ``"RGB"``.

    Args:
        path: the image file.
        mode: Pillow mode to convert to.
        size: (width, height) to resize to (bilinear), or None to keep the size.

    Raises:
        GraftIOError: Pillow is missing, or the file is too large or not an image.
    """
    try:
        from PIL import Image
    except ImportError as e:
        raise GraftIOError(
            f"reading images ({path}) needs Pillow: pip install 'graft[images]'"
        ) from e
    try:
        if path.stat().st_size > MAX_IMAGE_BYTES:
            raise GraftIOError(f"{path} is larger than {MAX_IMAGE_BYTES:,} bytes; downscale it")
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise GraftIOError(f"{path} has {im.width}x{im.height} pixels; downscale it")
            im = im.convert(mode)
            if size is not None and im.size != size:
                im = im.resize(size, Image.Resampling.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except GraftIOError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise GraftIOError(f"cannot read image {path}: {str(e)[:120]}; check the file") from e
    return arr
