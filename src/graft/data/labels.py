"""Class labels of any type, as integer ids.

Convention: the label values of a data set are canonicalised to strings (a whole number
``3``, ``3.0`` or ``"3"`` all read as ``"3"``; ``true`` as ``"true"``), and ids follow the
sorted order of those strings — numerically when every label is a whole number (so
``"10"`` follows ``"9"``), else as text. The list is recorded (``label_names``) with every
head graft trains, and data evaluated with a head is mapped through the *head's* list, so a
test file that lacks a class, or lists classes in another order, still gets the ids the
head was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from graft.recipe import RecipeError


class DataError(RecipeError):
    """A data file or data set graft cannot use; one line naming the file, row or column."""


def canonical_label(value: object) -> str | None:
    """The string a label value is known by, or None for a missing value."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            return str(int(text))
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text
        return str(int(number)) if math.isfinite(number) and number.is_integer() else text
    raise DataError(f"a label must be a number, a string or a bool, got {type(value).__name__}")


def sorted_labels(names: Sequence[str]) -> tuple[str, ...]:
    """Distinct label names in id order: numeric when all are whole numbers, else text."""
    distinct = set(names)
    if all(_is_int(n) for n in distinct):
        return tuple(sorted(distinct, key=int))
    return tuple(sorted(distinct))


def encode_labels(
    values: Sequence[object],
    *,
    where: Sequence[str],
    known: Sequence[str] | None = None,
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Label ids (N,) int64 and the id -> name list.

    Args:
        values: one raw label per example.
        where: per example, how to name it in an error (``"data.csv line 7"``).
        known: the label names of a head; ids then index this list.

    Raises:
        DataError: a missing label, or (with ``known``) a label the head does not have.
    """
    names = []
    for value, place in zip(values, where, strict=True):
        try:
            name = canonical_label(value)
        except DataError as e:
            raise DataError(f"{place}: {e}") from None
        if name is None:
            raise DataError(f"{place}: the label is missing or empty; give every example a label")
        names.append(name)
    order = tuple(known) if known is not None else sorted_labels(names)
    index = {n: i for i, n in enumerate(order)}
    ids = np.empty(len(names), dtype=np.int64)
    for i, (name, place) in enumerate(zip(names, where, strict=True)):
        j = index.get(name)
        if j is None:
            shown = ", ".join(order[:10]) + (", ..." if len(order) > 10 else "")
            raise DataError(
                f"{place}: label {name!r} is not one the head knows ({shown}); "
                "evaluate with the head trained on these classes"
            )
        ids[i] = j
    return ids, order


def remap(ids: np.ndarray, names: Sequence[str], known: Sequence[str], where: str) -> np.ndarray:
    """Ids into ``names`` re-expressed as ids into ``known`` (a head's label list).

    Raises:
        DataError: a label in use is not in ``known``.
    """
    index = {n: i for i, n in enumerate(known)}
    table = np.full(len(names), -1, dtype=np.int64)
    for i, n in enumerate(names):
        table[i] = index.get(n, -1)
    used = np.unique(ids)
    missing = [names[i] for i in used if table[i] < 0]
    if missing:
        shown = ", ".join(list(known)[:10])
        raise DataError(
            f"{where}: label {missing[0]!r} is not one the head knows ({shown}); "
            "evaluate with the head trained on these classes"
        )
    return table[ids]


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True
