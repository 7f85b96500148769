"""A sharded safetensors writer whose memory use does not depend on model size.

Every output tensor's name, dtype and shape is known before any is computed, so the
writer lays out all shards and headers up front, creates each file at its final size,
and `write` puts one tensor's bytes at its offset with `os.pwrite`: any order, any
thread, nothing buffered.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import threading
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.io._errors import GraftIOError, is_no_space, no_space_error
from graft.io._format import CODE_OF_DTYPE, encode_header

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' "5GB"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class SizeError(GraftIOError, ValueError):
    """A size (``--out-shard-size``) that is malformed or not positive."""


def parse_size(size: str | int, *, what: str = "size") -> int:
    """Bytes in a size such as ``"5GB"`` (decimal, as transformers reads it), ``"2GiB"``
    (binary), ``"500MB"`` or an int.

    Args:
        size: the size.
        what: how the error names it (e.g. ``"--out-shard-size"``).

    Raises:
        SizeError: (a ValueError) the size is malformed or not positive.
    """
    hint = "give a positive size such as 5GB, 500MB or 2GiB"
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise SizeError(f"invalid {what} {size}: {hint}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = m and m.group(2).upper()
    if not m or unit not in _UNITS or int(float(m.group(1)) * _UNITS[unit]) <= 0:
        raise SizeError(f"invalid {what} {str(size)!r}: {hint}")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class _Slot:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    shard: int
    offset: int  # absolute, in the shard file


def _group_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], max_bytes: int):
    """Greedy in entry order, by data bytes: a shard closes when the next tensor would
    overflow it; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[3]
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def plan_shards(
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    *,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
) -> list[list[tuple[str, int]]]:
    """The shards `ShardedWriter` lays ``entries`` out in: per shard, its tensors as
    ``(name, bytes)`` in entry order. What a distributed merge splits its work by."""
    planned = [_check_entry(*e) for e in entries]
    groups = _group_shards(planned, parse_size(max_shard_bytes))
    return [[(e[0], e[3]) for e in group] for group in groups]


def write_shard_index(
    out_dir: str | os.PathLike,
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    *,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    filename: str = "model.safetensors",
) -> Path | None:
    """Write the shard index `ShardedWriter.finish` writes, for shards that writers with
    ``only_shards`` wrote separately; None (nothing written) for a single shard.

    Returns:
        The index file, or None.
    """
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    if len(shards) == 1:
        return None
    names = shard_file_names(filename, len(shards))
    weight_map = {n: names[i] for i, group in enumerate(shards) for n, _ in group}
    order = [e[0] for e in entries]
    total = sum(b for group in shards for _, b in group)
    return _write_index_file(Path(out_dir), filename, {n: weight_map[n] for n in order}, total)


def _write_index_file(out_dir: Path, filename: str, weight_map: dict, total: int) -> Path:
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    path = out_dir / f"{filename}.index.json"
    with open(path, "x", encoding="utf-8") as f:
        f.write(json.dumps(index, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def shard_file_names(filename: str, n: int) -> list[str]:
    """transformers' names: ``model.safetensors``, or ``model-00001-of-00003.safetensors``."""
    if n == 1:
        return [filename]
    stem, dot, ext = filename.rpartition(".")
    return [f"{stem}-{i:05d}-of-{n:05d}{dot}{ext}" for i in range(1, n + 1)]


class ShardedWriter:
    """Writes planned tensors into (sharded) safetensors files, one `pwrite` per tensor.

    Args:
        out_dir: an existing directory (usually from `atomic_output_dir`).
        entries: every output tensor as ``(name, dtype, shape)``, in output order.
        max_shard_bytes: most tensor bytes per shard (a larger tensor goes alone), as an
            int or a size string for `parse_size` (``"5GB"``).
        metadata: the safetensors ``__metadata__``; ``format: pt`` is always included.
        filename: the file name for one shard; shards and index derive from it.
        only_shards: write only these shards (indices into `plan_shards`), each byte for
            byte as the full writer would, and no index (`write_shard_index` writes it):
            how the workers of a distributed merge share one output.

    Raises:
        ValueError: duplicate or reserved names, an unsupported dtype, a bad shape.
        GraftIOError: the files cannot be created, or the disk has too little free space.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        *,
        max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
        metadata: dict[str, str] | None = None,
        filename: str = "model.safetensors",
        only_shards: Collection[int] | None = None,
    ):
        self.out_dir = Path(out_dir)
        self._filename = filename
        self._metadata = {**(metadata or {}), "format": "pt"}
        planned = [_check_entry(*e) for e in entries]
        if len({e[0] for e in planned}) != len(planned):
            raise ValueError("duplicate tensor names in the output plan")
        groups = _group_shards(planned, parse_size(max_shard_bytes))
        names = shard_file_names(filename, len(groups))
        self.files = [self.out_dir / n for n in names]
        self.total_bytes = sum(e[3] for e in planned)
        self._whole = only_shards is None
        mine = set(range(len(groups))) if only_shards is None else set(only_shards)
        if not mine <= set(range(len(groups))):
            raise ValueError(f"only_shards {sorted(mine)} outside the {len(groups)} shards")
        self._order = [e[0] for i, g in enumerate(groups) if i in mine for e in g]
        self._slots: dict[str, _Slot] = {}
        self._fds: dict[int, int] = {}
        self._written: set[str] = set()
        self._lock = threading.Lock()
        self._closed = False
        _check_free_space(self.out_dir, sum(e[3] for i in mine for e in groups[i]))
        try:
            for shard, group in enumerate(groups):
                if shard in mine:
                    self._fds[shard] = self._create_shard(shard, group)
        except BaseException:
            self.close()
            raise

    def _create_shard(self, shard: int, group: list) -> int:
        # Largest itemsize first (stable) keeps every tensor aligned to its dtype, as the
        # reference writer does, so readers can view the data without copying.
        group = sorted(group, key=lambda e: -e[1].itemsize)
        spans, pos = [], 0
        for name, dtype, shape, nbytes in group:
            spans.append((name, dtype, shape, pos, pos + nbytes))
            pos += nbytes
        header = encode_header(spans, self._metadata)
        for name, dtype, shape, begin, end in spans:
            self._slots[name] = _Slot(name, dtype, shape, end - begin, shard, len(header) + begin)
        path = self.files[shard]
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666
            )
        except OSError as e:
            raise GraftIOError(f"cannot create {path}: {e.strerror}; check the output path") from e
        try:
            _pwrite_all(fd, memoryview(header), 0)
            os.ftruncate(fd, len(header) + pos)
        except OSError as e:
            os.close(fd)
            if is_no_space(e):
                raise no_space_error(path) from e
            raise
        return fd

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write planned tensor `name`. Thread-safe; any order; each name exactly once.

        Raises:
            ValueError: `name` is not planned or already written, or the tensor's dtype or
                shape differs from the plan.
            GraftIOError: the disk is full.
        """
        slot = self._slots.get(name)
        if slot is None:
            raise ValueError(f"tensor {name!r} is not in the output plan")
        if tensor.dtype != slot.dtype or tuple(tensor.shape) != slot.shape:
            raise ValueError(
                f"tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                f"planned {slot.dtype} {slot.shape}"
            )
        data = tensor.detach().cpu().contiguous()
        with self._lock:
            if self._closed:
                raise ValueError(f"cannot write {name!r}: the writer is closed")
            if name in self._written:
                raise ValueError(f"tensor {name!r} written twice")
            self._written.add(name)
        if slot.nbytes == 0:
            return
        try:
            buf = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            _pwrite_all(self._fds[slot.shard], buf, slot.offset)
        except BaseException as e:
            with self._lock:
                self._written.discard(name)
            if is_no_space(e):
                raise no_space_error(self.files[slot.shard]) from e
            raise

    def finish(self) -> list[Path]:
        """Check every planned tensor was written, flush to disk, write the shard index.

        Returns:
            The shard files, then the index file if there is more than one shard.

        Raises:
            ValueError: some planned tensors were never written.
            GraftIOError: the disk is full.
        """
        missing = [n for n in self._order if n not in self._written]
        if missing:
            raise ValueError(f"{len(missing)} planned tensors were never written: {missing[:3]}")
        paths = [self.files[i] for i in sorted(self._fds)]
        try:
            for fd in self._fds.values():
                os.fsync(fd)
            if self._whole and len(self.files) > 1:
                paths.append(self._write_index())
        except OSError as e:
            if is_no_space(e):
                raise no_space_error(self.out_dir) from e
            raise
        finally:
            self.close()
        return paths

    def _write_index(self) -> Path:
        weight_map = {n: self.files[self._slots[n].shard].name for n in self._order}
        return _write_index_file(self.out_dir, self._filename, weight_map, self.total_bytes)

    def close(self) -> None:
        """Close the files without checking completeness (for error paths)."""
        with self._lock:
            self._closed = True
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On success, `finish`; on an exception, just `close`."""
        if exc_type is None and not self._closed:
            self.finish()
        else:
            self.close()


def _check_entry(name: str, dtype: torch.dtype, shape: Sequence[int]):
    if not isinstance(name, str) or not name or name == "__metadata__":
        raise ValueError(f"invalid tensor name {name!r}")
    if dtype not in CODE_OF_DTYPE:
        raise ValueError(f"tensor {name!r}: dtype {dtype} has no safetensors code")
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor {name!r}: negative dimension in shape {shape}")
    return name, dtype, shape, math.prod(shape) * dtype.itemsize


def _check_free_space(out_dir: Path, needed: int) -> None:
    """Fail before writing anything when the plan cannot fit, instead of at 90%."""
    try:
        free = shutil.disk_usage(out_dir).free
    except OSError as e:
        raise GraftIOError(f"cannot use output directory {out_dir}: {e.strerror}") from e
    if free < needed:
        raise GraftIOError(
            f"no space left on device for {out_dir}: the output needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free space or choose another output path"
        )


def _pwrite_all(fd: int, buf: memoryview, offset: int) -> None:
    # pwrite may write less than asked (Linux caps one call at ~2 GiB), so loop.
    done = 0
    while done < len(buf):
        n = os.pwrite(fd, buf[done:], offset + done)
        if n <= 0:
            raise OSError(f"pwrite wrote {n} bytes")
        done += n
