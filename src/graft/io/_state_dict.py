"""Whole-model convenience verbs for small models, tests and demos."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from graft.io._atomic import atomic_output_dir
from graft.io._checkpoint import open_checkpoint
from graft.io._sidecar import copy_sidecar_files
from graft.io._writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint into memory (copies, detached from the file).

    Use `open_checkpoint` for anything large: this holds the whole model at once.
    """
    with open_checkpoint(path) as ckpt:
        return {name: ckpt.get(name).clone() for name in ckpt.names}


def save_state_dict(
    tensors: dict[str, torch.Tensor],
    dst_dir: str | os.PathLike,
    *,
    config: dict | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    force: bool = False,
) -> Path:
    """Atomically write `tensors` (and `config` as config.json) as a Hugging Face model dir.

    Writes exactly the tensors given, under their names and dtypes: tied weights given
    under two names are stored twice (transformers loads either form).

    Raises:
        GraftIOError: `dst_dir` exists and not `force`; the disk is full.
    """
    entries = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    with atomic_output_dir(dst_dir, force=force) as tmp:
        with ShardedWriter(tmp, entries, max_shard_bytes=max_shard_bytes, metadata=metadata) as w:
            for name, t in tensors.items():
                w.write(name, t)
        copy_sidecar_files(None, tmp, config=config)
    return Path(dst_dir)
