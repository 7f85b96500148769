"""A rich progress bar for streaming passes: tensors done, GB/s and ETA, on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
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
