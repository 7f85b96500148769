"""Atomic output directories: a reader of the target sees the old output or the whole new
one, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from graft.io._errors import GraftIOError, is_no_space, no_space_error


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Build an output directory in a hidden temp dir beside `target`, then move it there.

    The temp dir (``.{name}.graft-tmp-<random>``) is on the same filesystem, so the final
    move is a rename. With `force`, an existing target is renamed aside, the new one
    renamed in, then the old one deleted. On any exception, KeyboardInterrupt included,
    the temp dir is removed and the exception re-raised; after a SIGKILL only the hidden
    temp dir remains, never a partial target.

    Args:
        target: the output directory to create.
        force: replace `target` if it exists.

    Yields:
        The temp directory to write into.

    Raises:
        GraftIOError: `target` exists and not `force`; the disk filled up while writing.
    """
    target = Path(target)
    if _exists(target):
        if not force:
            raise GraftIOError(
                f"output {target} exists; pass --force to overwrite or choose another path"
            )
        if Path.cwd().resolve().is_relative_to(target.resolve()):
            raise GraftIOError(f"refusing to replace {target}: it holds the current directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.graft-tmp-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, target, force=force)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e):
            raise no_space_error(target) from e
        raise


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _move_into_place(tmp: Path, target: Path, *, force: bool) -> None:
    if not _exists(target):
        os.rename(tmp, target)
    elif not force:
        raise GraftIOError(
            f"output {target} exists; pass --force to overwrite or choose another path"
        )
    else:
        old = target.parent / f".{target.name}.graft-old-{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    _fsync_dir(target.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so the rename publishes durable data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output_file(target: str | os.PathLike, *, force: bool) -> Iterator[Path]:
    """Like `atomic_output_dir`, for one file: yields a path to write the file at, inside a
    hidden staging dir beside `target`, and renames it to `target` on success.

    Raises:
        GraftIOError: `target` exists and not `force`, or is a directory; the disk filled up.
    """
    target = Path(target)
    if target.is_dir():
        raise GraftIOError(f"output {target} is a directory; give a file path")
    if _exists(target) and not force:
        raise GraftIOError(
            f"output {target} exists; pass --force to overwrite or choose another path"
        )
    staging = target.parent / f".{target.name}.graft-file"
    with atomic_output_dir(staging, force=True) as tmp:
        yield tmp / target.name
        os.replace(tmp / target.name, target)
    shutil.rmtree(staging, ignore_errors=True)
