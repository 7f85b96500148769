"""One place that turns what a user types (a model, ``--head``, ``--data``, ``--zoo``) into a
`Runner` and a `Dataset` that fit each other. Every data command goes through it.

Zoo tasks: ``--data task:NAME`` reads that task's split from the zoo in ``--zoo`` (default
``graft-demo/zoo`` for digits tasks, ``graft-demo/text-zoo`` for text tasks) and, unless
``--head`` is given, runs the model with the zoo's fine-tuned head for the task.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from graft.data._loading import load_runner
from graft.data.dataset import DataOptions, Dataset, read_data
from graft.data.labels import DataError
from graft.data.runner import Runner
from graft.io import GraftIOError, read_json

DEFAULT_ZOOS = {"digits": Path("graft-demo/zoo"), "text": Path("graft-demo/text-zoo")}


def task_family(spec: str) -> str | None:
    """``"digits"`` or ``"text"`` for a zoo task spec, None for a path."""
    from graft.data.zoo_tasks import digits_task_names, text_task_names

    name = spec.removeprefix("task:")
    if not spec.startswith("task:") and Path(spec).exists():
        return None
    if name in digits_task_names():
        return "digits"
    if name in text_task_names():
        return "text"
    return None


def default_zoo(spec: str, zoo: str | os.PathLike | None) -> Path | None:
    """The zoo folder for a data spec: ``zoo`` when given, else the family's default."""
    if zoo is not None:
        return Path(zoo)
    family = task_family(spec)
    return DEFAULT_ZOOS[family] if family else None


def zoo_head(zoo: str | os.PathLike | None, task: str | None) -> Path | None:
    """The fine-tuned head a zoo keeps for ``task`` (its manifest's ``heads`` entry)."""
    if zoo is None or task is None:
        return None
    manifest = Path(zoo) / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        doc = read_json(manifest, fix="rebuild the zoo")
    except GraftIOError as e:
        raise DataError(str(e)) from None
    heads = doc.get("heads") if isinstance(doc, dict) else None
    rel = heads.get(task) if isinstance(heads, dict) else None
    if not isinstance(rel, str) or "\0" in rel:
        return None
    path = (Path(zoo) / rel).resolve()
    if not path.is_relative_to(Path(zoo).resolve()) or not path.is_file():
        return None
    return path


def open_model_data(
    model: str | os.PathLike,
    data: str | os.PathLike | None,
    *,
    head: str | os.PathLike | None = None,
    zoo: str | os.PathLike | None = None,
    split: str = "test",
    options: DataOptions | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    need_head: bool = True,
    use_labels: bool = True,
) -> tuple[Runner, Dataset | None]:
    """Load a model (with its head) and a data set that fits it.

    Returns:
        The runner and the data mapped to the head's label ids (None without ``data``).

    ``use_labels=False`` (a pass that reads inputs only, a Gram matrix) drops the data's
    labels, so labels the head does not know are no error there.

    Raises:
        DataError: the model, head or data cannot be used together (one line, with the fix).
    """
    dataset = None
    zoo_root = None
    if data is not None:
        zoo_root = default_zoo(str(data), zoo)
        dataset = read_data(data, options, zoo=zoo_root, split=split)
        if not use_labels and dataset.labels is not None:
            dataset = replace(dataset, labels=None, label_names=())
        if head is None:
            head = zoo_head(zoo_root, dataset.task)
    runner = load_runner(model, head=head, pooling=pooling, max_length=max_length)
    if need_head and not runner.has_head:
        raise DataError(
            f"{model} has no classification head; pass --head (a head file, or a "
            "sequence-classification model folder whose classifier to use)"
        )
    if dataset is not None:
        dataset = runner.prepare(dataset)
    return runner, dataset
