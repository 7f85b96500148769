"""Tasks a candidate merge is judged on: per task a runner (with that task's head) and its
data, and the mean accuracy of an in-memory merged state over them.

How ``--data`` / ``--head`` pair up with the models being merged (`load_tasks`):

* one data set per model, in order (AdaMerging, a multi-task search): task ``i`` runs
  model ``i``'s folder with ``--head``'s ``i``-th entry, else the zoo's head for a
  ``task:NAME`` spec, else model ``i``'s own classifier (or its ``head.safetensors``);
* one data set for all (a soup, a single-task search): the reference model (the base, or
  the first model) with the one ``--head``, the zoo's head, or its own.

A task's runner only lends its architecture and head: `score` swaps the merged weights in
(`graft.data.Runner.bind`), so the runner's own backbone weights are never used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.data import DataOptions, Dataset, Runner, evaluate, open_model_data
from graft.data.labels import DataError


@dataclass(frozen=True)
class Task:
    """One task: a name, a runner with the task's head, and its examples."""

    name: str
    runner: Runner
    data: Dataset


def load_tasks(
    models: Sequence[str | os.PathLike],
    data: Sequence[str],
    *,
    heads: Sequence[str | os.PathLike] = (),
    reference: str | os.PathLike | None = None,
    zoo: str | os.PathLike | None = None,
    split: str = "val",
    options: DataOptions | None = None,
    pooling: str | None = None,
    max_length: int | None = None,
    per_model: bool = False,
) -> list[Task]:
    """The tasks for ``data`` (module docstring).

    Args:
        models: the models being merged, in recipe order (base excluded).
        data: one spec, or one per model.
        heads: none, one, or one per data spec.
        reference: the model a single data set is run with (default: ``models[0]``).
        per_model: require one data set per model (AdaMerging).

    Raises:
        DataError: the counts do not pair up, or a task has no head.
    """
    if not data:
        raise DataError("no data: pass --data (one file, or one per model)")
    if per_model and len(data) != len(models):
        raise DataError(
            f"{len(data)} --data for {len(models)} models; give one data set per model, in order"
        )
    if len(data) not in (1, len(models)):
        raise DataError(
            f"{len(data)} --data for {len(models)} models; give one data set, or one per model"
        )
    if len(heads) not in (0, 1, len(data)):
        raise DataError(f"{len(heads)} --head for {len(data)} --data; give none, one, or one each")
    tasks = []
    for i, spec in enumerate(data):
        model = models[i] if len(data) == len(models) else (reference or models[0])
        head = heads[i] if len(heads) == len(data) else (heads[0] if heads else None)
        runner, ds = open_model_data(
            model,
            spec,
            head=head,
            zoo=zoo,
            split=split,
            options=options,
            pooling=pooling,
            max_length=max_length,
            need_head=True,
        )
        name = ds.task or (Path(spec).stem if Path(spec).exists() else spec)
        if any(t.name == name for t in tasks):
            name = f"{name}#{i}"
        tasks.append(Task(name, runner, ds))
    return tasks


def score(
    tasks: Sequence[Task],
    state: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, dict[str, float]]:
    """Mean accuracy over the tasks of the merged ``state``, and per task."""
    accs = {}
    for t in tasks:
        params = t.runner.bind(state)
        accs[t.name] = float(
            evaluate(t.runner, t.data, batch_size=batch_size, params=params, progress=progress)[
                "accuracy"
            ]
        )
    return sum(accs.values()) / len(accs), accs
