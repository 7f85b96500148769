"""Small readers, each bounded: regular files only (`open_regular`), JSON with size and
nesting limits (`read_json`), arrays (.npz / .npy / .csv), model cards (YAML front matter
with node and nesting limits), the raw bytes of pickles (never unpickled) and a model
folder's files.

The limits sit far above any real file and far below what exhausts memory or the stack.
"""

from __future__ import annotations

import csv
import json
import os
import stat
import zipfile
from pathlib import Path
from typing import BinaryIO

import numpy as np
import yaml

from graft.io._errors import GraftIOError

ARRAY_SUFFIXES = (".npz", ".npy", ".csv")
# Files that may hold weights or pickles, as `graft lint` looks for them in a folder.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# The safetensors reference refuses headers above 100 MB; no JSON file graft reads (config,
# shard index, adapter config, manifest) may be larger either. The largest real ones, shard
# indexes of 1000-layer models, are a few MB.
MAX_JSON_BYTES = 100_000_000
# Levels of nested objects / lists in any JSON or YAML graft reads. Real configs and cards
# nest fewer than 10; Python's parsers overflow the stack near 1,000.
MAX_NESTING = 64
# A model card's front matter: bytes of README.md, and YAML nodes with every alias
# expanded. The largest cards on the Hub (MTEB model-index tables) hold some 40,000 nodes;
# a 500-byte alias bomb expands to billions.
MAX_CARD_BYTES = 16 * 2**20
MAX_CARD_NODES = 100_000
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def open_regular(path: Path) -> int:
    """A read-only file descriptor of the regular file at ``path``.

    Pipes, sockets and devices are refused before they are opened for reading: opening a
    FIFO blocks until something writes to it and a device may never end. The open itself
    is non-blocking and the descriptor is checked again, in case the path changed between.

    Raises:
        GraftIOError: the path is missing, unreadable or not a regular file.
    """
    try:
        _check_regular(path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise GraftIOError(f"no such file or directory: {path}") from None
    except OSError as e:
        raise GraftIOError(
            f"cannot read {path}: {e.strerror}; check the path and permissions"
        ) from e
    except ValueError:  # an embedded NUL byte
        raise GraftIOError(f"{path!r} is not a usable file name; check the path") from None
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_regular(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a plain file")
    raise GraftIOError(
        f"{path} is {kind}, not a regular file; graft reads only regular files, "
        "so pass the file itself"
    )


def read_regular(path: Path, *, max_bytes: int, fix: str) -> bytes:
    """The bytes of the regular file at ``path``, refused when larger than ``max_bytes``.

    Raises:
        GraftIOError: as `open_regular`, or the file is too large (the message ends in ``fix``).
    """
    fd = open_regular(path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise GraftIOError(
                f"{path} is {size:,} bytes, more than the {max_bytes:,} graft reads from such "
                f"a file; {fix}"
            )
        try:
            return f.read(max_bytes + 1)[:max_bytes]
        except OSError as e:
            raise GraftIOError(f"cannot read {path}: {e.strerror}; {fix}") from e


class _JSONLimit(ValueError):
    pass


def loads_json(
    raw: bytes | str,
    *,
    unique_keys: bool = False,
    strict: bool = False,
    max_depth: int | None = MAX_NESTING,
) -> object:
    """Parse JSON text within graft's limits.

    Args:
        raw: UTF-8 bytes or text.
        unique_keys: refuse an object that names a key twice (``json`` keeps the last).
        strict: refuse ``NaN`` / ``Infinity``, which Python accepts and JSON does not.
        max_depth: refuse documents nested deeper; None skips the walk (the caller checks
            the structure itself). Nesting Python cannot parse is refused either way.

    Raises:
        ValueError: with a one-line reason.
    """
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not valid JSON (not UTF-8: bad byte at offset {e.start})") from None
    hooks: dict = {}
    if unique_keys:
        hooks["object_pairs_hook"] = _unique_object
    if strict:
        hooks["parse_constant"] = _no_constant
    try:
        doc = json.loads(raw, **hooks)
    except _JSONLimit:
        raise
    except RecursionError:
        deep = f"more than {max_depth} levels deep" if max_depth else "too deeply to parse"
        raise ValueError(f"nested {deep}") from None
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e})") from None
    if max_depth is not None and _nesting(doc) > max_depth:
        raise ValueError(f"nested more than {max_depth} levels deep")
    return doc


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _JSONLimit(f"key {_show(twice)} appears twice in one object")
    return out


def _no_constant(name: str) -> object:
    raise _JSONLimit(f"{name} is not a JSON value")


def _nesting(doc: object) -> int:
    """Levels of nested dicts / lists in ``doc`` (0 for a scalar), without recursion."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        x, depth = todo.pop()
        children = x.values() if isinstance(x, dict) else x if isinstance(x, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        todo.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return deepest


def read_json(
    path: Path, *, fix: str, unique_keys: bool = False, max_bytes: int = MAX_JSON_BYTES
) -> object:
    """The parsed JSON file at ``path``, within `loads_json`'s limits and ``max_bytes``.

    Raises:
        GraftIOError: the file is missing, not regular, too large or not acceptable JSON;
            one line naming the file and ending in ``fix``.
    """
    raw = read_regular(path, max_bytes=max_bytes, fix=fix)
    try:
        return loads_json(raw, unique_keys=unique_keys)
    except ValueError as e:
        raise GraftIOError(f"cannot parse {path}: {e}; {fix}") from None


def _show(value: object, limit: int = 200) -> str:
    """``repr(value)``, shortened: for messages that must stay one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Arrays stored in a ``.npz``, ``.npy`` or ``.csv`` file, by name.

    A ``.npz`` gives its keys; a ``.npy`` gives ``{"data": array}``; a CSV whose first row
    is not numeric gives one 1-D float array per column, named by that header row,
    otherwise ``{"data": (rows, columns) float array}``. Object arrays (pickles) and
    complex, date and record arrays are refused.

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
            arrays = {"data": np.load(p, allow_pickle=False)}
        else:
            with np.load(p, allow_pickle=False) as loaded:  # a lazy archive
                arrays = {k: np.asarray(loaded[k]) for k in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise GraftIOError(
            f"cannot read {p}: {_one_line(e)}; save arrays with numpy.save / numpy.savez"
        ) from e
    for name, array in arrays.items():
        if array.dtype.kind not in "biufUS":  # complex numbers, dates, records
            raise GraftIOError(
                f"{p}: array {_show(name, 60)} is {array.dtype}; graft reads arrays of real "
                "numbers (bool, integer, float) or of strings"
            )
    return arrays


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

    The card may be at most `MAX_CARD_BYTES`; its front matter at most `MAX_NESTING` deep
    and `MAX_CARD_NODES` YAML nodes, aliases expanded (`load_yaml`).

    Raises:
        GraftIOError: the card exists but is too large, not UTF-8, or its front matter is
            not valid YAML or exceeds those limits.
    """
    p = Path(path)
    card = p / "README.md" if p.is_dir() else p
    if not card.is_file():
        return None
    fix = "fix the card's front matter or remove it"
    raw = read_regular(card, max_bytes=MAX_CARD_BYTES, fix=fix)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GraftIOError(f"cannot read {card}: not UTF-8 text (byte {e.start}); {fix}") from None
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        return None
    try:
        doc = load_yaml(text[3:end], max_nodes=MAX_CARD_NODES)
    except ValueError as e:
        raise GraftIOError(f"{card} has invalid YAML front matter: {e}; {fix}") from None
    return doc if isinstance(doc, dict) else None


def load_yaml(text: str, *, max_nodes: int, max_depth: int = MAX_NESTING) -> object:
    """``yaml.safe_load`` of one document, bounded: at most ``max_nodes`` YAML nodes with
    every alias expanded, nested at most ``max_depth`` deep (`_BoundedLoader`).

    Raises:
        ValueError: with a one-line reason, for invalid YAML, a value its constructors
            cannot build (an impossible date, an integer of thousands of digits) or a
            document beyond the limits.
    """
    loader = None
    try:
        loader = _BoundedLoader(text)  # checks the characters already
        loader.max_nodes, loader.max_depth = max_nodes, max_depth
        return loader.get_single_data()
    except _YAML_ERRORS as e:
        raise _yaml_error(e) from None
    finally:
        if loader is not None:
            loader.dispose()


_YAML_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError)


def _yaml_error(e: BaseException) -> ValueError:
    """One line for what a YAML load raised, with the line and column where YAML knows them."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        why = " ".join(p for p in (e.context, e.problem) if p) or type(e).__name__
        return ValueError(_one_line(why) + where)
    return ValueError(_one_line(e))


def load_yaml_documents(
    text: str, *, max_nodes: int, max_depth: int = MAX_NESTING
) -> list[tuple[object, str]]:
    """Every document of a multi-document YAML stream (``---`` separated), bounded as
    `load_yaml` (``max_nodes`` counts all documents together), each with its own source
    text (from its first node to its last, for a recipe's model card).

    Raises:
        ValueError: as `load_yaml`.
    """
    loader = None
    docs: list[tuple[object, str]] = []
    try:
        loader = _BoundedLoader(text)
        loader.max_nodes, loader.max_depth = max_nodes, max_depth
        while loader.check_node():
            loader._sizes = {}  # anchors are per document
            node = loader.get_node()
            if node is None:
                continue
            source = text[node.start_mark.index : node.end_mark.index]
            docs.append((loader.construct_document(node), source))
        return docs
    except _YAML_ERRORS as e:
        raise _yaml_error(e) from None
    finally:
        if loader is not None:
            loader.dispose()


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that bounds the document it composes: nesting depth and node
    count, each alias counted as the whole subtree it stands for, so an alias bomb (each
    level a list of aliases of the level before) is refused while still small. Aliases that
    refer to the node they are inside (recursive structures) are refused too."""

    max_nodes = MAX_CARD_NODES
    max_depth = MAX_NESTING

    def __init__(self, stream):
        super().__init__(stream)
        self._nodes = 0  # composed so far, aliases expanded
        self._depth = 0
        self._deepest = 0  # deepest level reached inside the node being composed
        self._sizes: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, height)

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self.anchors and event.anchor not in self._sizes:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"alias *{event.anchor} refers to a node it is part of",
                    event.start_mark,
                )
            nodes, height = self._sizes.get(event.anchor, (0, 0))
            self._grow(nodes, self._depth + height, event)
            return super().compose_node(parent, index)
        outer, before = self._deepest, self._nodes
        self._depth += 1
        self._deepest = self._depth
        self._grow(1, self._depth, event)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if event.anchor is not None:
            self._sizes[event.anchor] = (self._nodes - before, self._deepest - self._depth)
        self._deepest = max(outer, self._deepest)
        return node

    def _grow(self, nodes: int, depth: int, event) -> None:
        self._nodes += nodes
        self._deepest = max(self._deepest, depth)
        if self._nodes > self.max_nodes:
            why = f"more than {self.max_nodes:,} YAML nodes (aliases expanded)"
        elif depth > self.max_depth:
            why = f"nested more than {self.max_depth} levels deep"
        else:
            return
        raise yaml.composer.ComposerError(None, None, why, event.start_mark)


def open_binary(path: str | os.PathLike) -> BinaryIO:
    """The regular file at ``path`` opened for reading bytes (`open_regular`'s checks): for
    scanners that need a whole file as a seekable stream, such as the pickle scan, which
    reads pickles as bytes and never unpickles them.

    Raises:
        GraftIOError: the path is missing, unreadable or not a regular file.
    """
    return os.fdopen(open_regular(Path(path)), "rb")


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


def _one_line(e: object) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
