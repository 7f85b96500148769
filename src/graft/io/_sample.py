"""Reading a few rows of a tensor, and how many bytes a header-only look at a checkpoint
costs: the zoo index's cheap view of a model's weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from graft.io._checkpoint import Checkpoint, _pread_into

FINGERPRINT_PREFIX_BYTES = 256  # what Checkpoint.fingerprint reads per tensor


def read_rows(
    ckpt: Checkpoint, name: str, rows: Sequence[int], col_start: int, ncols: int
) -> torch.Tensor:
    """Elements ``[col_start, col_start + ncols)`` of the given rows of tensor ``name``.

    The tensor is seen as ``(shape[0], numel // shape[0])``. For safetensors files only
    those bytes are read (one ``pread`` per row).

    Returns:
        ``(len(rows), ncols)`` in the stored dtype.
    """
    info = ckpt.info(name)
    nrows = info.shape[0]
    width = info.numel // nrows
    if ckpt._reads_whole(name):  # torch files are loaded (mmap) whole; decoded ones decode
        full = ckpt.get(name).reshape(nrows, width)
        return full[list(rows), col_start : col_start + ncols].clone()
    out = torch.empty((len(rows), ncols), dtype=info.dtype)
    fd, base, item = ckpt._fd(info.file), ckpt._offsets[name], info.dtype.itemsize
    for i, r in enumerate(rows):
        _pread_into(fd, out[i], base + (r * width + col_start) * item, info.file)
    return out


def header_nbytes(ckpt: Checkpoint) -> int:
    """Bytes read to open ``ckpt``: every safetensors header, or whole torch files."""
    if ckpt._loaded is not None:
        return sum(ckpt._file_sizes.values()) or sum(ckpt.info(n).nbytes for n in ckpt.names)
    first: dict = {}
    for name, off in ckpt._offsets.items():
        f = ckpt._stored_info(name).file
        first[f] = min(first.get(f, off), off)
    return sum(first.values())


def fingerprint_nbytes(ckpt: Checkpoint) -> int:
    """Bytes `Checkpoint.fingerprint` reads (a prefix of every tensor)."""
    return sum(min(FINGERPRINT_PREFIX_BYTES, ckpt.info(n).nbytes) for n in ckpt.names)
