"""graft's built-in zoo tasks as `Dataset`s: the digits tasks (arrays) and the text tasks
(texts), each split fixed by the zoo's seed."""

from __future__ import annotations

import os
from pathlib import Path

from graft.data.dataset import Dataset
from graft.data.labels import DataError
from graft.io import GraftIOError, read_json

SPLITS = ("train", "val", "test")


def digits_task_names() -> list[str]:
    from graft.zoo.tasks import TASKS

    return list(TASKS)


def text_task_names() -> list[str]:
    from graft.zoo.text_tasks import TEXT_TASKS

    return list(TEXT_TASKS)


def all_task_names() -> list[str]:
    return digits_task_names() + text_task_names()


def zoo_manifest(zoo: str | os.PathLike | None) -> dict:
    """A zoo folder's manifest ({} without a zoo)."""
    if zoo is None:
        return {}
    manifest = Path(zoo) / "manifest.json"
    if not manifest.is_file():
        return {}
    try:
        doc = read_json(manifest, fix="rebuild the zoo")
    except GraftIOError as e:
        raise DataError(str(e)) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("seed", 0), int):
        raise DataError(f"{manifest} is not a zoo manifest (no integer seed); rebuild the zoo")
    return doc


def zoo_task_data(
    task: str, *, split: str = "test", zoo: str | os.PathLike | None = None
) -> Dataset:
    """One split of a zoo task, with that zoo's seed.

    Raises:
        DataError: unknown task or split, or the task's source data is missing.
    """
    if split not in SPLITS and split != "pretrain":
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    doc = zoo_manifest(zoo)
    seed = doc.get("seed", 0)
    name = f"task {task} ({split} split)"
    if task in digits_task_names():
        from graft.zoo.tasks import TASKS, task_data

        X, y = task_data(task, split, seed=seed)
        names = tuple(str(i) for i in range(TASKS[task].num_classes))
        return Dataset(name, y.numpy(), names, x=X.numpy(), task=task)
    if task in text_task_names():
        from graft.zoo.text_tasks import TextDataError
        from graft.zoo.text_zoo import FULL, TEXT_ZOO_FORMAT, task_split

        config = doc["build_config"] if doc.get("format") == TEXT_ZOO_FORMAT else FULL
        try:
            return task_split(task, split, seed, config)
        except (TextDataError, ValueError, KeyError, TypeError) as e:
            raise DataError(f"{name}: {e}") from None
    raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(all_task_names())}")
