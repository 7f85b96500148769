"""The zoo index database file: where it lives by default and how it is opened.

The index is one SQLite file (stdlib ``sqlite3``). This module owns the file: choosing the
default location, creating its folder, opening it with graft's schema and refusing a file
that is not a graft index. Callers get a `sqlite3.Connection` and commit through it
(``with con: ...`` is one transaction).
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from graft.io._errors import GraftIOError


def default_db_path() -> Path:
    """The index file used when none is given.

    ``$GRAFT_ZOO_DB`` if set, else ``$XDG_CACHE_HOME/graft/zoo.sqlite``, else
    ``~/.cache/graft/zoo.sqlite``.
    """
    env = os.environ.get("GRAFT_ZOO_DB")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "graft" / "zoo.sqlite"


def open_db(path: str | os.PathLike, schema: str, *, version: int, create: bool = True):
    """Open (or create) the SQLite file at ``path`` and make sure ``schema`` exists.

    Args:
        path: the database file.
        schema: ``CREATE ... IF NOT EXISTS`` statements, run on every open.
        version: the schema version, stored as SQLite's ``user_version``; a file with
            another non-zero version is refused rather than misread.
        create: create the file when it is missing; otherwise a missing file is an error.

    Returns:
        A `sqlite3.Connection` with ``row_factory = sqlite3.Row`` and foreign keys on.

    Raises:
        GraftIOError: the file cannot be created or opened, is not a SQLite database, or
            was written by another schema version.
    """
    path = Path(path)
    if not path.exists() and not create:
        raise GraftIOError(f"no zoo index at {path}; run `graft zoo scan PATH --db {path}` first")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=30)
    except (OSError, sqlite3.Error) as e:
        raise GraftIOError(f"cannot open zoo index {path}: {e}; check the path") from e
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA foreign_keys = ON")
        found = con.execute("PRAGMA user_version").fetchone()[0]
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        if found == 0 and tables:  # graft sets user_version when it creates its tables
            raise GraftIOError(
                f"{path} is a SQLite database graft did not write (it holds "
                f"{', '.join(tables[:3])[:80]}); pass another --db, graft leaves it as it is"
            )
        if found not in (0, version):
            raise GraftIOError(
                f"zoo index {path} has schema version {found}, this graft writes {version}; "
                "delete the file (it is a cache) and scan again"
            )
        with con:
            con.executescript(schema)
            con.execute(f"PRAGMA user_version = {int(version)}")
    except sqlite3.DatabaseError as e:
        con.close()
        raise GraftIOError(
            f"{path} is not a graft zoo index ({e}); pass another --db or delete the file"
        ) from e
    except GraftIOError:
        con.close()
        raise
    return con
