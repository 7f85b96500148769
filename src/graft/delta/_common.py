"""What the delta passes share: the report they return, the delta of two checkpoints read
per tensor, and writing one safetensors file through the engine."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from graft import __version__
from graft.delta.patch import FORMAT_VERSION, DeltaError, Entry
from graft.io import Checkpoint, ShardedWriter, atomic_output_file
from graft.plan import RunStats, default_threads, run_pass

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
    """

    stats: RunStats
    output: Path
    overlapped: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_on_disk: int = 0
    bytes_before: int = 0

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

    def delta(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        ft = self.ft.get(name).to(device=device, dtype=torch.float32)
        return ft - self.base.get(name).to(device=device, dtype=torch.float32)

    def replacement(self, name: str) -> torch.Tensor:
        return self.ft.get(name)


def write_file(out, entries, meta, order, work, input_bytes, threads, force, progress) -> Report:
    """Stream ``order`` through ``work`` into one safetensors file at ``out``, atomically."""
    with atomic_output_file(out, force=force) as path:
        writer = ShardedWriter(
            path.parent, entries, max_shard_bytes=1 << 62, metadata=meta, filename=path.name
        )
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
