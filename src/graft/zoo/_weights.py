"""What the zoo index records about a checkpoint from its headers, plus a small, fixed
sample of its weights for lineage.

The sample is the same for every checkpoint with the same tensor names and shapes (it is
chosen from the names and shapes alone), so any two models of one family are compared on
the same rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from graft.io import Checkpoint, TensorInfo, read_rows

SAMPLE_ELEMENTS = 1 << 15  # per model: at most 128 KiB of float32 in the index
SAMPLE_TENSORS = 64  # at most this many tensors are sampled
SAMPLE_ROWS = 16  # rows per tensor (more when rows are narrow)


@dataclass(frozen=True)
class SampleSpec:
    """Elements ``[col_start, col_start + ncols)`` of ``rows`` of tensor ``name``, viewed
    as ``(shape[0], numel // shape[0])``."""

    name: str
    rows: tuple[int, ...]
    col_start: int
    ncols: int

    @property
    def size(self) -> int:
        return len(self.rows) * self.ncols


def signature(infos: list[TensorInfo]) -> str:
    """Hash of the sorted ``(name, shape)`` pairs: equal for models that can be compared
    tensor by tensor, whatever their dtypes or sharding."""
    text = json.dumps(sorted([i.name, list(i.shape)] for i in infos))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(ckpt: Checkpoint) -> dict:
    """Format, architecture, sizes, dtypes and signature of ``ckpt``, from headers only."""
    infos = [ckpt.info(n) for n in ckpt.names]
    config = ckpt.config or {}
    files = {i.file for i in infos}
    kind = "safetensors" if all(f.suffix == ".safetensors" for f in files) else "torch"
    dtypes = Counter()
    for i in infos:
        dtypes[str(i.dtype).removeprefix("torch.")] += i.numel
    arch = (config.get("architectures") or [None])[0]
    return {
        "format": kind + ("-sharded" if len(files) > 1 else ""),
        "architecture": arch,
        "model_type": config.get("model_type"),
        "num_params": sum(i.numel for i in infos),
        "num_tensors": len(infos),
        "total_bytes": sum(i.nbytes for i in infos),
        "dtypes": dict(dtypes.most_common()),
        "signature": signature(infos),
    }


def plan_sample(
    infos: list[TensorInfo],
    *,
    budget: int = SAMPLE_ELEMENTS,
    max_tensors: int = SAMPLE_TENSORS,
    rows: int = SAMPLE_ROWS,
) -> list[SampleSpec]:
    """Which elements to sample: up to ``max_tensors`` floating-point matrices (ndim >= 2,
    >= 2 rows), chosen and cut by a hash of their name and shape, ``budget`` elements in
    all. Rows are sampled (not elements) so a "null" comparison of row ``k`` against row
    ``k + 1`` of another model is possible (see `graft.zoo.lineage`)."""
    cands = [
        i for i in infos if i.dtype.is_floating_point and len(i.shape) >= 2 and i.shape[0] >= 2
    ]
    cands.sort(key=lambda i: _digest(i))
    cands = sorted(cands[:max_tensors], key=lambda i: i.name)
    if not cands:
        return []
    per = max(budget // len(cands), 4)
    plan = []
    for info in cands:
        nrows, width = info.shape[0], info.numel // info.shape[0]
        r = min(nrows, rows)
        c = min(width, max(1, per // r))
        r = min(nrows, max(r, per // c))
        rng = np.random.default_rng(_digest(info))
        chosen = tuple(sorted(int(x) for x in rng.choice(nrows, size=r, replace=False)))
        start = int(rng.integers(0, width - c + 1))
        plan.append(SampleSpec(info.name, chosen, start, c))
    return plan


def plan_hash(plan: list[SampleSpec]) -> str:
    text = json.dumps([[s.name, s.rows, s.col_start, s.ncols] for s in plan])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_sample(ckpt: Checkpoint, plan: list[SampleSpec]) -> tuple[torch.Tensor, int]:
    """The planned elements as one float32 vector (spec after spec), and the bytes read."""
    parts, nbytes = [], 0
    for spec in plan:
        t = read_rows(ckpt, spec.name, spec.rows, spec.col_start, spec.ncols)
        nbytes += t.numel() * t.element_size()
        parts.append(t.float().reshape(-1))
    return (torch.cat(parts) if parts else torch.empty(0)), nbytes


def split_sample(data: torch.Tensor, plan: list[SampleSpec]) -> list[torch.Tensor]:
    """The flat sample back as one ``(rows, ncols)`` matrix per spec."""
    out, pos = [], 0
    for spec in plan:
        out.append(data[pos : pos + spec.size].reshape(len(spec.rows), spec.ncols))
        pos += spec.size
    return out


def plan_to_json(plan: list[SampleSpec]) -> str:
    return json.dumps([[s.name, list(s.rows), s.col_start, s.ncols] for s in plan])


def plan_from_json(text: str) -> list[SampleSpec]:
    return [SampleSpec(n, tuple(r), c, k) for n, r, c, k in json.loads(text)]


def _digest(info: TensorInfo) -> int:
    h = hashlib.sha256(f"{info.name}|{list(info.shape)}".encode()).digest()
    return int.from_bytes(h[:8], "little")
