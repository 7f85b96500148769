"""A rich progress bar for streaming passes: tensors done, GB/s and ETA, on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


@contextmanager
def tensor_progress(
    label: str, tensors: int, total_bytes: int, *, enabled: bool = True
) -> Iterator[Callable[[int, int], None]]:
    """Yields a hook ``(tensors_delta, bytes_delta)`` that advances the bar.

    The bar and the ETA follow bytes (reads + writes), which is what the time goes on.
    With ``total_bytes`` 0 (not known up front) the bar only counts and shows the speed.
    """
    if not enabled:
        yield lambda n, b: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[done]}/{task.fields[tensors]} tensors"),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    with progress:
        task = progress.add_task(label, total=total_bytes or None, done=0, tensors=tensors or "?")
        done = 0

        def hook(n: int, nbytes: int) -> None:
            nonlocal done
            done += n
            progress.update(task, advance=nbytes, done=done)

        yield hook


@contextmanager
def count_progress(
    label: str, total: int | None, *, unit: str = "examples", enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yields a hook ``(n_delta)`` that advances a bar of ``total`` items (examples, steps,
    candidates), on stderr; ``total`` None shows a counter only."""
    if not enabled:
        yield lambda n: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    with progress:
        task = progress.add_task(escape(label), total=total)
        yield lambda n: progress.advance(task, n)
