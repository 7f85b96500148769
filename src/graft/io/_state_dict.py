"""Whole-model convenience verbs for small models, tests and demos."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from graft.io._atomic import atomic_output_dir, atomic_output_file
from graft.io._checkpoint import open_checkpoint
from graft.io._errors import GraftIOError
from graft.io._format import parse_header
from graft.io._sidecar import copy_sidecar_files
from graft.io._writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into memory (tensors the caller owns).

    Use `open_checkpoint` for anything large: this holds the whole model at once.
    """
    with open_checkpoint(path) as ckpt:
        return {name: ckpt.get(name) for name in ckpt.names}


def save_state_dict(
    tensors: dict[str, torch.Tensor],
    dst_dir: str | os.PathLike,
    *,
    config: dict | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    force: bool = False,
    overwrite_anything: bool = False,
) -> Path:
    """Atomically write `tensors` (and `config` as config.json) as a Hugging Face model dir.

    Writes exactly the tensors given, under their names and dtypes: tied weights given
    under two names are stored twice (transformers loads either form).

    Args:
        force: replace `dst_dir` if graft wrote it (see `graft.io.check_output`).
        overwrite_anything: with `force`, replace whatever folder is there.

    Raises:
        GraftIOError: `dst_dir` exists and may not be replaced; the disk is full.
    """
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with atomic_output_dir(dst_dir, force=force, overwrite_anything=overwrite_anything) as tmp:
        with ShardedWriter(tmp, entries, max_shard_bytes=max_shard_bytes, metadata=metadata) as w:
            for name, t in tensors.items():
                w.write(name, t)
        copy_sidecar_files(None, tmp, config=config)
    return Path(dst_dir)


def save_statistics(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    kind: str,
    model_fingerprint: str,
    metadata: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Atomically write per-tensor statistics (Fisher diagonals, Gram matrices...) to one
    ``.safetensors`` file whose metadata names the statistic and the model it describes.

    Args:
        tensors: statistic per tensor name of the model it was computed on.
        path: the output file.
        kind: ``graft_statistic`` metadata (what data-aware methods check for).
        model_fingerprint: ``Checkpoint.fingerprint()`` of the model, so a merge can refuse
            statistics computed on another model.
        metadata: extra string metadata (sample count, task, ...).
        force: replace an existing file.
    """
    dst = Path(path)
    meta = {
        **(metadata or {}),
        "graft_statistic": kind,
        "graft_model_fingerprint": model_fingerprint,
    }
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with (
        atomic_output_file(dst, force=force) as file,
        ShardedWriter(
            file.parent, entries, max_shard_bytes=1 << 62, metadata=meta, filename=dst.name
        ) as w,
    ):
        for name, t in tensors.items():
            w.write(name, t.contiguous())
    return dst


def mmap_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors model (a folder of shards, or one file) as a
    copy-on-write memory map: nothing is read until a tensor is touched, and the pages
    it touches can be evicted again, so a model larger than memory can still be run.

    Raises:
        GraftIOError: not a safetensors model, or a corrupt file.
    """
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    if not files or any(f.suffix != ".safetensors" for f in files):
        raise GraftIOError(f"{p} holds no .safetensors files to map; pass a model graft wrote")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        header = parse_header(file)
        data = np.memmap(file, dtype=np.uint8, mode="c") if header.file_size > 8 else None
        for located in header.tensors:
            info = located.info
            if info.nbytes == 0:
                out[info.name] = torch.empty(info.shape, dtype=info.dtype)
                continue
            raw = torch.from_numpy(data[located.offset : located.offset + info.nbytes])
            out[info.name] = raw.view(info.dtype).reshape(info.shape)
    return out
