"""graft's built-in zoo tasks as `Dataset`s: the digits tasks (arrays) and the text tasks
(texts), each split fixed by the zoo's seed."""

from __future__ import annotations

import json
import os
from pathlib import Path

from graft.data.dataset import Dataset
from graft.data.labels import DataError

SPLITS = ("train", "val", "test")


def digits_task_names() -> list[str]:
    from graft.zoo.tasks import TASKS

    return list(TASKS)


def text_task_names() -> list[str]:
    from graft.zoo.text_tasks import TEXT_TASKS

    return list(TEXT_TASKS)


def all_task_names() -> list[str]:
    return digits_task_names() + text_task_names()


def zoo_seed(zoo: str | os.PathLike | None) -> int:
    """The seed a zoo folder was built with (its manifest), or 0 without a zoo."""
    if zoo is None:
        return 0
    manifest = Path(zoo) / "manifest.json"
    if not manifest.is_file():
        return 0
    try:
        seed = json.loads(manifest.read_text(encoding="utf-8")).get("seed", 0)
    except (OSError, ValueError, AttributeError) as e:
        raise DataError(f"cannot read {manifest}: {e}; rebuild the zoo") from None
    if not isinstance(seed, int):
        raise DataError(f"{manifest}: seed is not an integer; rebuild the zoo")
    return seed


def zoo_task_data(
    task: str, *, split: str = "test", zoo: str | os.PathLike | None = None
) -> Dataset:
    """One split of a zoo task, with that zoo's seed.

    Raises:
        DataError: unknown task or split, or the task's source data is missing.
    """
    if split not in SPLITS and split != "pretrain":
        raise DataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    seed = zoo_seed(zoo)
    name = f"task {task} ({split} split)"
    if task in digits_task_names():
        from graft.zoo.tasks import TASKS, task_data

        X, y = task_data(task, split, seed=seed)
        names = tuple(str(i) for i in range(TASKS[task].num_classes))
        return Dataset(name, y.numpy(), names, x=X.numpy(), task=task)
    if task in text_task_names():
        from graft.zoo.text_tasks import TEXT_TASKS, TextDataError, text_task_data

        try:
            texts, labels = text_task_data(task, split, seed=seed)
        except TextDataError as e:
            raise DataError(str(e)) from None
        return Dataset(name, labels, TEXT_TASKS[task].label_names, texts=texts, task=task)
    raise DataError(f"unknown task {task!r}; valid tasks: {', '.join(all_task_names())}")
