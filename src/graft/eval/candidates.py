"""Merging a candidate for evaluation: in memory when it fits, else streamed to a scratch
folder and memory-mapped back, so a candidate larger than memory is paged, not refused."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from graft.io import mmap_state_dict
from graft.plan import MergePlan, merge_in_memory, run_plan

# Keep this share of the available memory for the model runners and the evaluation.
MEMORY_SHARE = 0.5
# A candidate with a NaN/Inf input scores NaN: an error, not a candidate.
_NON_FINITE = "a candidate with non-finite weights cannot be scored; fix the checkpoint"


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable`` on Linux; free pages elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 62


class CandidateMerger:
    """``merger(plan) -> state``: the planned merge, in memory or spilled (module docstring).
    An input tensor with NaN or Inf is an error (`graft.plan.NonFiniteInputError`).

    Spilled candidates go to a scratch folder under ``scratch`` (default: the system's temp
    folder), removed when the next candidate comes or on `close`.
    """

    def __init__(
        self,
        *,
        threads: int | None = None,
        scratch: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.threads = threads
        self.scratch = Path(scratch) if scratch is not None else None
        self.log = log
        self._spill: Path | None = None
        self.spilled = 0

    def __call__(self, plan: MergePlan) -> dict[str, torch.Tensor]:
        self._clear()
        if plan.output_bytes() <= MEMORY_SHARE * available_memory():
            return merge_in_memory(plan, threads=self.threads, strict=_NON_FINITE)
        self._spill = Path(tempfile.mkdtemp(prefix=".graft-candidate-", dir=self.scratch))
        out = self._spill / "model"
        if self.log is not None:
            self.log(
                f"candidate of {plan.output_bytes() / 1e9:.1f} GB does not fit in memory: "
                f"streaming it to {out}"
            )
        run_plan(plan, out, threads=self.threads, strict=_NON_FINITE)
        self.spilled += 1
        return mmap_state_dict(out)

    def _clear(self) -> None:
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def close(self) -> None:
        self._clear()
