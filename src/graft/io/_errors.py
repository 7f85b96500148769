"""The one exception type graft's I/O layer raises for problems with files on disk."""

from __future__ import annotations

import errno

# EDQUOT (quota exceeded) reads the same to a user as a full disk.
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class GraftIOError(Exception):
    """A file or directory cannot be read or written.

    The message is one line that names the file or tensor and says how to fix it.
    """


def is_no_space(exc: BaseException) -> bool:
    """True when `exc`, or the OSError it was raised from, means the disk is full."""
    causes = (exc, exc.__cause__)
    return any(isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS for e in causes)


def no_space_error(path: object) -> GraftIOError:
    return GraftIOError(
        f"no space left on device while writing {path}; free space or choose another output path"
    )
