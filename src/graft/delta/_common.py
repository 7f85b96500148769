"""What the delta passes share: the report they return, the delta of two checkpoints read
per tensor, and writing one safetensors file through the engine."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft import __version__
from graft.delta.patch import FORMAT_VERSION, DeltaError, Entry
from graft.io import Checkpoint, ShardedWriter, atomic_output_file
from graft.plan import NonFiniteInputError, RunStats, default_threads, run_pass
from graft.plan.engine import all_finite

ProgressHook = Callable[[int, int], None]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Report:
    """What a delta pass did: the engine's statistics plus what the user should know.

    Attributes:
        stats: tensors, bytes read/written, seconds.
        output: the path written.
        overlapped: tensors whose shapes differed, changed over the overlapping rows only.
        untouched: base tensors no delta changes (copied unchanged).
        warnings: e.g. a base hash mismatch accepted with ``force_base``.
        bytes_on_disk: size of the output file (compress, diff, extract-lora).
        bytes_before: size of the input delta file (compress).
        notes: facts about the output worth a line (e.g. tensors stored dense).
    """

    stats: RunStats
    output: Path
    overlapped: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_on_disk: int = 0
    bytes_before: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.bytes_before / max(self.bytes_on_disk, 1)


class PairDelta:
    """``ft - base`` of two open checkpoints, read per tensor: a delta never written.

    Non-float tensors (ids, masks) are ``replace`` entries when ``keep_ints`` (a diff
    records them so apply gives the fine-tune back exactly), else left out (a transfer
    keeps the new base's).
    """

    def __init__(self, ft: Checkpoint, base: Checkpoint, *, keep_ints: bool = True):
        self.ft, self.base, self.path = ft, base, ft.path
        self.base_fingerprint = None
        self.layout = {}
        for name in ft.names:
            info = ft.info(name)
            if name not in base:
                raise DeltaError(
                    f"tensor {name} of {ft.path} is not in {base.path}; the fine-tune and its "
                    "base must share an architecture"
                )
            if tuple(base.info(name).shape) != tuple(info.shape):
                raise DeltaError(
                    f"shape mismatch for {name}: {ft.path} has {tuple(info.shape)}, {base.path} "
                    f"has {tuple(base.info(name).shape)}; give the base this model was tuned from"
                )
            if info.dtype.is_floating_point:
                self.layout[name] = Entry(tuple(info.shape), "dense", {})
            elif keep_ints:
                self.layout[name] = Entry(tuple(info.shape), "replace", {})

    def nbytes(self, name: str) -> int:
        return self.ft.info(name).nbytes + self.base.info(name).nbytes

    def delta(
        self, name: str, device: torch.device | str = "cpu", check: FiniteCheck | None = None
    ) -> torch.Tensor:
        """``ft - base`` of tensor ``name`` in float32; ``check`` is told which model holds
        NaN or Inf when the difference is not finite."""
        ft = self.ft.get(name).to(device=device, dtype=torch.float32)
        out = ft - self.base.get(name).to(device=device, dtype=torch.float32)
        if check is not None and not all_finite(out):
            check(ft, name, f"model {self.ft.path}")
            check(self.base.get(name), name, f"model {self.base.path}")
        return out

    def replacement(self, name: str) -> torch.Tensor:
        return self.ft.get(name)


class FiniteCheck:
    """Reports input tensors holding NaN or Inf, as merges do: a warning each, or with
    ``strict`` a `NonFiniteInputError`. Thread-safe.

    Args:
        strict: fail on the first one.
        fix: the end of the error message (what to do about it).
    """

    def __init__(self, strict: bool, fix: str = "fix the checkpoint or drop --strict"):
        self.strict = strict
        self.fix = fix
        self.warnings: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, t: torch.Tensor, name: str, where: str) -> None:
        if all_finite(t):
            return
        msg = f"tensor {name} of {where} contains NaN or Inf"
        if self.strict:
            raise NonFiniteInputError(f"{msg}; {self.fix}")
        with self._lock:
            self.warnings.append(msg)


def file_output(out: str | os.PathLike) -> Path:
    """``out`` with the ``.safetensors`` extension graft's readers need, added if missing."""
    out = Path(out)
    return out if out.suffix == ".safetensors" else out.with_name(out.name + ".safetensors")


def write_file(
    out, entries, meta, order, work, input_bytes, threads, force, progress, inputs: Sequence = ()
) -> Report:
    """Stream ``order`` through ``work`` into one safetensors file at ``out``, atomically."""
    with (
        atomic_output_file(out, force=force, inputs=inputs) as path,
        ShardedWriter(
            path.parent, entries, max_shard_bytes=1 << 62, metadata=meta, filename=path.name
        ) as writer,
    ):
        stats = run_pass(
            list(order),
            lambda n: work(n, writer),
            threads=threads or default_threads(),
            input_bytes=input_bytes,
            progress=progress,
        )
        writer.finish()
    report = Report(stats, Path(out))
    report.bytes_on_disk = os.path.getsize(out)
    return report


def delta_metadata(method, base, base_path, ft, ft_path, params, layout, dtype) -> dict[str, str]:
    return {
        "graft_delta": FORMAT_VERSION,
        "graft_delta_method": method,
        "graft_version": __version__,
        "graft_base": str(base_path),
        "graft_base_fingerprint": base.fingerprint(),
        "graft_finetuned": str(ft_path),
        "graft_finetuned_fingerprint": ft.fingerprint(),
        "graft_dtype": str(dtype),
        "graft_params": json.dumps(params, sort_keys=True),
        "graft_layout": json.dumps(layout, sort_keys=True),
    }


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise DeltaError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def common_dtype(ckpt: Checkpoint, names) -> str:
    """The dtype of the float tensors, or ``mixed``."""
    found = {
        str(ckpt.info(n).dtype).replace("torch.", "")
        for n in names
        if ckpt.info(n).dtype.is_floating_point
    }
    return found.pop() if len(found) == 1 else "mixed"
