"""Ray, imported lazily (the optional extra ``graft[ray]``), and joining a cluster."""

from __future__ import annotations

import os
from types import ModuleType

from graft.recipe import RecipeError

INSTALL = "pip install 'graft[ray]'"


class RayError(RecipeError):
    """Ray is missing, the cluster cannot be reached, or it lost work for good."""


def import_ray() -> ModuleType:
    """The ``ray`` module, or a one-line error naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise RayError(f"--ray needs Ray, which is not installed; {INSTALL}") from None
    return ray


def connect(address: str) -> ModuleType:
    """Join the Ray cluster at ``address`` (once per process) and return ``ray``.

    Args:
        address: ``auto`` (the cluster ``ray start`` runs here, or ``RAY_ADDRESS``),
            ``local`` (start a Ray instance on this machine for this command), or a cluster
            address (``10.0.0.1:6379``, ``ray://head:10001``). When this process has already
            joined a cluster (a test, a notebook), that one is used.

    Raises:
        RayError: Ray is not installed, or no cluster answers at ``address``.
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address == "local":
            # This instance exists for one command on this machine: its workers run at
            # the command's own priority, not Ray's default nice 15 (docs/scale-out.md).
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RayError(
            f"cannot join the Ray cluster at --ray {address}: {first}; start one with "
            "`ray start --head`, give its address, or pass --ray local"
        ) from None
    return ray
