"""Output paths: checked against the inputs, built in a hidden temp folder beside the
target, published by one rename.

What graft promises about every output (docs/security.md, "file-system safety"):

* An output never is, holds or lies inside an input (symlinks resolved; a Hugging Face
  cache snapshot's blob files count as part of the snapshot).
* ``force`` replaces only an empty folder or a folder graft wrote, which graft marks with a
  small JSON file, `MARKER` (``.graft``), written into every folder it publishes; anything
  else needs ``overwrite_anything`` (the CLI's ``--force-overwrite-anything``). A file
  output replaces a file, never a folder.
* A reader of the target sees the old output or the whole new one, never a partial one.
* Ctrl-C and SIGTERM remove the temp folder (SIGTERM then exits with status 143). After
  a SIGKILL the temp folder stays; it records its owner (host, pid, process start time,
  boot id) so the next run into the same target removes it once that owner is gone.
* Folders and files get the modes the umask gives (typically 0755 and 0644), as
  transformers' ``save_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from graft.io._errors import GraftIOError, is_no_space, no_space_error

MARKER = ".graft"  # in every folder graft publishes: what lets --force replace it
_OWNER = ".graft-owner"  # in temp folders: who is writing it
_TMP, _OLD = "graft-tmp-", "graft-old-"
_MAX_ENTRIES = 10_000  # entries of an input folder looked at (a model folder has a few)


class Terminated(SystemExit):
    """SIGTERM arrived while an output was being written; the temp folder is removed."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


# --- the checks ------------------------------------------------------------------------


def check_output(
    target: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
    overwrite_anything: bool = False,
    kind: str = "dir",
) -> None:
    """Refuse an output path graft must not write; the one check every command runs.

    Args:
        target: the output folder (``kind="dir"``) or file (``kind="file"``).
        inputs: the files and folders the command reads.
        force: an existing target may be replaced: a file, or a folder that is empty or
            holds `MARKER`.
        overwrite_anything: with ``force``, replace any existing folder.
        kind: ``"dir"`` or ``"file"``.

    Raises:
        GraftIOError: the target is, holds or lies inside an input; it exists and
            ``force`` does not allow replacing it; it holds the working directory.
    """
    target = Path(target)
    real = target.resolve()
    for given in inputs:
        _check_apart(target, real, Path(given))
    if not _exists(target):
        return
    if Path.cwd().resolve().is_relative_to(real):
        raise GraftIOError(f"refusing to replace {target}: it holds the current directory")
    is_dir = target.is_dir() and not target.is_symlink()
    if kind == "file":
        if is_dir:
            raise GraftIOError(f"output {target} is a directory; give a file path")
        if not force:
            raise GraftIOError(
                f"output {target} exists; pass --force to overwrite or choose another path"
            )
        return
    if not force:
        raise GraftIOError(
            f"output {target} exists; pass --force to overwrite or choose another path"
        )
    if overwrite_anything or target.is_symlink() or (is_dir and _replaceable(target)):
        return
    what = "is a file" if not is_dir else f"was not written by graft (it has no {MARKER} file)"
    raise GraftIOError(
        f"output {target} {what}; --force replaces only folders graft wrote: choose "
        "another path, remove it yourself, or pass --force-overwrite-anything to delete "
        "everything in it"
    )


def is_graft_output(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds the `MARKER` file graft writes into every output folder."""
    marker = Path(folder) / MARKER
    if marker.is_symlink() or not marker.is_file():
        return False
    try:
        doc = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "graft_version" in doc


def _replaceable(folder: Path) -> bool:
    try:
        empty = next(folder.iterdir(), None) is None
    except OSError:
        return False
    return empty or is_graft_output(folder)


def _check_apart(target: Path, real: Path, given: Path) -> None:
    if not _exists(given):
        return
    own = given.resolve()
    if own == real:
        raise GraftIOError(
            f"output {target} is the input {given}; choose another output path "
            "(graft never writes over its inputs)"
        )
    if own.is_relative_to(real):
        raise GraftIOError(
            f"output {target} holds the input {given}; choose another output path "
            "(replacing it would delete the input)"
        )
    if given.is_dir() and real.is_relative_to(own):
        raise GraftIOError(
            f"output {target} lies inside the input {given}; choose a path outside the inputs"
        )
    for part in _parts(given):  # e.g. a cache snapshot's blobs, a symlinked shard
        if part.is_relative_to(real):
            how = "is" if part == real else "holds"
            raise GraftIOError(
                f"output {target} {how} {part}, a file of the input {given}; choose "
                "another output path (graft never writes over its inputs)"
            )


def _parts(given: Path) -> list[Path]:
    """Where the files of an input folder really are (symlinks resolved), one level."""
    if not given.is_dir():
        return []
    out = []
    try:
        for i, entry in enumerate(given.iterdir()):
            if i >= _MAX_ENTRIES:
                break
            if entry.is_symlink():
                out.append(entry.resolve())
    except OSError:
        pass
    return out


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


# --- writing ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike,
    *,
    force: bool,
    inputs: Iterable[str | os.PathLike] = (),
    overwrite_anything: bool = False,
) -> Iterator[Path]:
    """Build an output directory in a hidden temp dir beside `target`, then move it there.

    The temp dir (``.{name}.graft-tmp-<random>``) is on the same filesystem, so the final
    move is a rename. With `force`, an existing target is renamed aside, the new one
    renamed in, then the old one deleted. On any exception, KeyboardInterrupt and SIGTERM
    included, the temp dir is removed and the exception re-raised; after a SIGKILL only
    the hidden temp dir remains, and the next run into `target` removes it.

    Args:
        target: the output directory to create.
        force: replace `target` if it exists and graft wrote it (see `check_output`).
        inputs: paths the caller reads; `target` must be apart from all of them.
        overwrite_anything: with `force`, replace whatever folder is at `target`.

    Yields:
        The temp directory to write into.

    Raises:
        GraftIOError: `target` may not be written (see `check_output`); the disk filled up.
    """
    from graft import __version__

    target = Path(target)
    inputs = list(inputs)
    rules = {"force": force, "overwrite_anything": overwrite_anything}
    check_output(target, inputs=inputs, **rules)
    with _staging(target) as tmp:
        yield tmp
        marker = {"graft_version": __version__, "written_by": "graft"}
        (tmp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        os.chmod(tmp / MARKER, 0o666 & ~_umask())
        _fsync_tree(tmp)
        check_output(target, inputs=inputs, **rules)  # again: the run may have been long
        _move_into_place(tmp, target)
        (target / _OWNER).unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output_file(
    target: str | os.PathLike, *, force: bool, inputs: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Like `atomic_output_dir`, for one file: yields a path to write the file at, inside a
    hidden temp dir beside `target`, and renames it to `target` on success.

    Raises:
        GraftIOError: `target` is an input or a directory, or exists and not `force`; the
            disk filled up.
    """
    target = Path(target)
    inputs = list(inputs)
    check_output(target, inputs=inputs, force=force, kind="file")
    with _staging(target) as tmp:
        yield tmp / target.name
        _fsync_file(tmp / target.name)
        check_output(target, inputs=inputs, force=force, kind="file")
        os.replace(tmp / target.name, target)
        _fsync_dir(target.parent)
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(near: str | os.PathLike) -> Iterator[Path]:
    """A hidden temp dir beside ``near`` for intermediate outputs (multi-document
    recipes), removed when the block ends, whatever happens; after a SIGKILL the next run
    into ``near`` removes it (it is named like `atomic_output_dir`'s temp dirs)."""
    with _staging(Path(near)) as tmp:
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_PART = ".part-"  # a worker's private folder inside a staging folder


@contextlib.contextmanager
def staging_part(stage: str | os.PathLike, key: str) -> Iterator[Path]:
    """A private folder inside the staging folder ``stage`` (from `atomic_output_dir`) for
    one of several writers of an output, e.g. a task of a distributed merge. On success its
    files are renamed into ``stage`` (replacing any an earlier, killed attempt published);
    on any exit the folder is removed. A writer killed midway leaves only its own folder,
    which `remove_parts` clears.

    Raises:
        GraftIOError: ``stage`` is not a folder this machine sees (not shared storage).
    """
    stage = Path(stage)
    if not stage.is_dir():
        raise GraftIOError(
            f"the staging folder {stage} is not visible on {socket.gethostname()}; put the "
            "output on storage every node mounts at the same path"
        )
    part = Path(tempfile.mkdtemp(prefix=f"{_PART}{key}-", dir=stage))
    try:
        yield part
        for file in sorted(part.iterdir()):
            os.replace(file, stage / file.name)
    finally:
        shutil.rmtree(part, ignore_errors=True)


def remove_parts(stage: str | os.PathLike) -> None:
    """Remove the `staging_part` folders that killed writers left in ``stage``."""
    for part in Path(stage).glob(f"{_PART}*"):
        shutil.rmtree(part, ignore_errors=True)


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A fresh temp dir beside ``target`` (stale ones of dead runs removed first), removed
    again on any exception; SIGTERM is turned into `Terminated` meanwhile."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{_TMP}", dir=target.parent))
    except OSError as e:
        raise _os_error(e, target) from e
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / _OWNER).write_text(json.dumps(_owner()) + "\n", encoding="utf-8")
        with _sigterm_as_exit():
            yield tmp
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_no_space(e):
            raise no_space_error(target) from e
        raise


def _os_error(e: OSError, target: Path) -> GraftIOError:
    if is_no_space(e):
        return no_space_error(target)
    blocker = next((p for p in target.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        return GraftIOError(
            f"cannot write {target}: {blocker} is a file, not a folder; choose another output path"
        )
    return GraftIOError(f"cannot write {target}: {e.strerror or e}; check the output path")


def _move_into_place(tmp: Path, target: Path) -> None:
    if not _exists(target):
        os.rename(tmp, target)
    else:
        old = target.parent / f".{target.name}.{_OLD}{secrets.token_hex(4)}"
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        if old.is_dir() and not old.is_symlink():
            with contextlib.suppress(OSError):  # lets a later run remove it if we die now
                (old / _OWNER).write_text(json.dumps(_owner()) + "\n", encoding="utf-8")
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    _fsync_dir(target.parent)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root`, so the rename publishes durable data."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        _fsync_dir(Path(dirpath))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask; read from /proc where it can be, since setting it to read it
    back briefly changes it for every thread."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While writing, SIGTERM raises `Terminated` (so the temp folder is cleaned up, as on
    Ctrl-C) unless someone else already handles or ignores SIGTERM."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut cleanup
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# --- debris of dead runs ---------------------------------------------------------------


def remove_stale_temps(target: str | os.PathLike) -> list[Path]:
    """Remove the temp (and set-aside old) folders of ``target`` whose writer is gone.

    A folder counts as stale only when its owner record says it was made on this host by
    a process that no longer runs: the pid is gone, or belongs to a process started at
    another time (a reused pid), or the machine has rebooted since. Folders without a
    record (another tool, an older graft) are left alone.

    Returns:
        The folders removed.
    """
    target = Path(target)
    prefixes = (f".{target.name}.{_TMP}", f".{target.name}.{_OLD}")
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefixes) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            owner = json.loads((entry / _OWNER).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            continue
        if isinstance(owner, dict) and _owner_gone(owner):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _owner() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid), "boot": _boot_id()}


def _owner_gone(owner: dict) -> bool:
    pid = owner.get("pid")
    if owner.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False  # another machine's (a shared filesystem): cannot tell
    boot = _boot_id()
    if boot and owner.get("boot") and owner["boot"] != boot:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    start = _start_time(pid)
    return start is not None and owner.get("start") is not None and start != owner["start"]


def _start_time(pid: int) -> int | None:
    """Clock ticks since boot at which ``pid`` started (Linux), else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; comm may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None
