"""Fault injection for tests/test_ray.py, installed in every Ray worker process of the test
cluster (``worker_process_setup_hook``): when the test creates the flag file named by
``GRAFT_TEST_KILL``, the first worker to write a tensor after that claims the file and
SIGKILLs its own process, mid-task; with ``<flag>.always`` every attempt dies."""

from __future__ import annotations

import os
import signal


def install() -> None:
    flag = os.environ.get("GRAFT_TEST_KILL")
    if not flag:
        return
    from graft.plan import engine

    call = engine._Worker.__call__

    def dying(self, job):
        written = call(self, job)
        if os.path.exists(flag + ".always"):
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            os.unlink(flag)  # only one process can claim it
        except FileNotFoundError:
            return written
        os.kill(os.getpid(), signal.SIGKILL)
        return written

    engine._Worker.__call__ = dying
