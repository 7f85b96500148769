"""A one-file safetensors writer for outputs whose sizes are known only once computed.

`ShardedWriter` lays out every tensor before the first is computed. A compressed patch
cannot be laid out up front: how many entries DARE keeps, or which rank an energy
threshold picks, is decided by the data. `SpoolWriter` appends each tensor's bytes to a
hidden spool file as it arrives (any thread, nothing buffered in memory), then `finish`
writes the header and copies the tensors into the final file in a fixed order, largest
itemsize first so that every tensor is aligned to its dtype. The spool is then deleted.
The final file is the same bytes whatever order the tensors arrived in.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from graft.io._errors import GraftIOError, is_no_space, no_space_error
from graft.io._format import CODE_OF_DTYPE, encode_header
from graft.io._writer import _pwrite_all

_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class _Spooled:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class SpoolWriter:
    """Writes tensors of unknown-in-advance shapes into one ``.safetensors`` file.

    Args:
        path: the final file; it must not exist. Use it inside `atomic_output_dir` (or
            `atomic_output_file`) so a failed run leaves nothing.

    Raises:
        GraftIOError: the spool file cannot be created.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._spool_path = self.path.with_name(f".{self.path.name}.spool")
        self._entries: dict[str, _Spooled] = {}
        self._end = 0
        self._lock = threading.Lock()
        try:
            self._fd = os.open(self._spool_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise GraftIOError(f"cannot create {self._spool_path}: {e.strerror}") from e

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append one tensor. Thread-safe; any order; each name exactly once.

        Raises:
            ValueError: a duplicate or reserved name, or a dtype safetensors cannot store.
            GraftIOError: the disk is full.
        """
        if not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if tensor.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} has no safetensors code")
        data = tensor.detach().cpu().contiguous()
        nbytes = data.numel() * data.element_size()
        with self._lock:
            if name in self._entries:
                raise ValueError(f"tensor {name!r} written twice")
            self._entries[name] = _Spooled(data.dtype, tuple(data.shape), self._end, nbytes)
            self._end += nbytes
        if nbytes:
            buf = memoryview(data.reshape(-1).view(torch.uint8).numpy())
            self._guard(lambda: _pwrite_all(self._fd, buf, self._entries[name].offset))

    def finish(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the final file (header, then the tensors by itemsize and name) and remove
        the spool.

        Args:
            metadata: the safetensors ``__metadata__``; ``format: pt`` is always included.

        Returns:
            The path of the file.
        """
        order = sorted(self._entries, key=lambda n: (-self._entries[n].dtype.itemsize, n))
        spans, pos = [], 0
        for name in order:
            e = self._entries[name]
            spans.append((name, e.dtype, e.shape, pos, pos + e.nbytes))
            pos += e.nbytes
        header = encode_header(spans, {**(metadata or {}), "format": "pt"})
        try:
            out = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            raise GraftIOError(f"cannot create {self.path}: {e.strerror}") from e
        try:
            self._guard(lambda: self._copy_out(out, header, spans))
        finally:
            os.close(out)
            self.close()
        return self.path

    def _copy_out(self, out: int, header: bytes, spans: list) -> None:
        _pwrite_all(out, memoryview(header), 0)
        for name, _, _, begin, _ in spans:
            e = self._entries[name]
            done = 0
            while done < e.nbytes:
                chunk = os.pread(self._fd, min(_COPY_CHUNK, e.nbytes - done), e.offset + done)
                if not chunk:
                    raise GraftIOError(f"spool file {self._spool_path} ended early")
                _pwrite_all(out, memoryview(chunk), len(header) + begin + done)
                done += len(chunk)
        os.fsync(out)

    def _guard(self, fn) -> None:
        try:
            fn()
        except OSError as e:
            if is_no_space(e):
                raise no_space_error(self.path) from e
            raise

    def close(self) -> None:
        """Close and delete the spool (the final file, if written, stays)."""
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
            self._spool_path.unlink(missing_ok=True)

    def __enter__(self) -> SpoolWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
