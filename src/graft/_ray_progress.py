"""The Ray actor that sums a distributed merge's progress (stdlib only).

It lives apart from `graft.plan.distributed` so that starting the actor's process imports
nothing heavy: Ray imports an actor's class by module path, and importing `graft.plan`
pulls in torch (seconds per process; minutes on a busy node, where Ray runs its workers
at nice 15).
"""

from __future__ import annotations


class Tracker:
    """The latest (tensors, bytes) of every task, keyed by its group; a retried attempt
    reports from zero again, replacing the failed attempt's count."""

    def __init__(self) -> None:
        self.done: dict[int, tuple[int, int]] = {}

    def report(self, key: int, tensors: int, nbytes: int) -> None:
        self.done[key] = (tensors, nbytes)

    def totals(self) -> tuple[int, int]:
        return sum(t for t, _ in self.done.values()), sum(b for _, b in self.done.values())
