"""The job cache's database: diskcache (SQLite) that stores JSON and refuses to unpickle.

diskcache's default disk pickles values, and a pickle runs code when read: anyone able to
write the folder could run code in every job (CVE-2025-69872). :class:`SafeJSONDisk` stores
JSON text and, unlike diskcache's own ``JSONDisk``, also refuses to read a row that claims
to be a pickle (a tampered database cannot smuggle one in). Values are kept inside the
SQLite file (no value files), so a row is all there is to check. Nothing is evicted behind
the user's back: every diskcache setting is pinned on each open (:data:`SETTINGS`:
``eviction_policy="none"``, no culling), so a setting changed under the cache by another
program (eviction on, ``size_limit=10``) is put back, with one warning since entries may have
been evicted meanwhile; settings diskcache does not know are removed (it would set them as
attributes of the cache object). A damaged write-ahead log (``cache.db-wal``), which SQLite
reads as empty, is one warning too. What a warning says was lost is computed again.

>>> import tempfile
>>> db = open_database(Path(tempfile.mkdtemp()) / "c")
>>> db.set("plan:x", {"kind": "plan"}); db.get("plan:x")
True
{'kind': 'plan'}
>>> db.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import diskcache

from bigjob.errors import CacheError
from bigjob.job.cache_folder import check_folder
from bigjob.job.sqlite_wal import wal_problem

__all__ = ["DB_TIMEOUT_S", "SETTINGS", "UNREADABLE", "SafeJSONDisk", "open_database", "remove_database"]

logger = logging.getLogger(__name__)

# What reading a damaged entry raises (zlib, JSON, a vanished value file).
UNREADABLE = (ValueError, TypeError, OSError, UnicodeDecodeError, zlib.error)
# How long to wait for SQLite's own lock before diskcache gives up.
DB_TIMEOUT_S = 60
# Every diskcache setting, given on each open (diskcache stores them in the database, and a
# setting left out is taken from there: whoever wrote it last would decide).
SETTINGS = {
    "statistics": 0,
    "tag_index": 0,
    "eviction_policy": "none",
    "size_limit": 2**62,
    "cull_limit": 0,  # no culling at all, expired or not
    "sqlite_auto_vacuum": 1,
    "sqlite_cache_size": 2**13,
    "sqlite_journal_mode": "wal",
    "sqlite_mmap_size": 2**26,
    "sqlite_synchronous": 1,
    "disk_min_file_size": 2**31,  # every value inside SQLite: no value files
    "disk_pickle_protocol": diskcache.core.DEFAULT_SETTINGS["disk_pickle_protocol"],  # never used: nothing is pickled
}
# The settings whose change can lose entries (evicted, or stored where bigjob does not look); others are put
# back quietly (culling with no eviction policy removes only expired entries, and bigjob sets no expiry).
_GUARDED = ("eviction_policy", "size_limit", "disk_min_file_size")
_KNOWN = set(SETTINGS) | set(diskcache.core.DEFAULT_SETTINGS) | set(diskcache.core.METADATA) | {"disk_compress_level"}


class SafeJSONDisk(diskcache.JSONDisk):
    """JSON keys and values; a row stored as a pickle is refused instead of unpickled.

    Compressed at zlib level 1 whatever the database's ``disk_compress_level`` says (it is
    not pinned there: diskcache's default disk, which other programs open it with, takes no such argument).
    """

    def __init__(self, directory: str, compress_level: int = 1, **kwargs: Any) -> None:
        super().__init__(directory, compress_level=1, **kwargs)

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:  # diskcache pickles keys that are not bytes/str/int/float
            raise ValueError("refusing a pickled cache key")
        return super().get(key, raw)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> Any:
        if mode == diskcache.core.MODE_PICKLE:
            raise ValueError("refusing a pickled cache value")
        return super().fetch(mode, filename, value, read)


def open_database(root: Path) -> diskcache.Cache:
    """The database in ``<root>/db``, after :func:`~bigjob.job.cache_folder.check_folder` passed ``root``.

    A database that cannot be opened is a CacheError saying how to remove it.
    """
    check_folder(root)
    if (root / "db").is_symlink() or (root / "db").exists() and not (root / "db").is_dir():
        raise CacheError(f"cache.dir={root} is not a bigjob cache ({root / 'db'} is not its database folder); choose another cache.dir")
    try:
        (root / "db").mkdir(mode=0o700, exist_ok=True)  # diskcache would make it 0755
        _check_log(root)
        _check_settings(root)
        return diskcache.Cache(str(root / "db"), disk=SafeJSONDisk, timeout=DB_TIMEOUT_S, **SETTINGS)
    except (sqlite3.DatabaseError, OSError) as err:
        raise CacheError(
            f"cannot open the cache database in {str(root)!r} ({err}); "
            f"run `bigjob-cache clear --dir {root}` or set cache.dir to another folder"
        ) from None


def _check_log(root: Path) -> None:
    """One warning when the write-ahead log is damaged: SQLite then reads it as empty, losing what it held."""
    log = root / "db" / (diskcache.core.DBNAME + "-wal")
    problem = wal_problem(log)
    if problem is not None:
        logger.warning(
            "the cache database's write-ahead log %s is damaged (%s); SQLite ignores it, so entries written since "
            "its last checkpoint are gone and are computed again", log, problem,
        )


def _check_settings(root: Path) -> None:
    """Removes settings diskcache does not know; one warning when one that can lose entries was changed.

    The pinned values are written back by the open that follows (:data:`SETTINGS`).
    """
    database = root / "db" / diskcache.core.DBNAME
    if not database.is_file():
        return
    with contextlib.closing(sqlite3.connect(database, timeout=DB_TIMEOUT_S)) as con, con:
        try:
            rows = con.execute("SELECT key, value FROM Settings").fetchall()
        except sqlite3.OperationalError:
            return  # no Settings table yet: diskcache makes it
        unknown = [key for key, _ in rows if key not in _KNOWN]
        for key in unknown:
            con.execute("DELETE FROM Settings WHERE key = ?", (key,))
    changed = [f"{key}={value!r}" for key, value in rows if key in _GUARDED and value != SETTINGS[key]]
    changed += [f"{key!r} (unknown to diskcache, removed)" for key in unknown]
    if changed:
        logger.warning(
            "the cache database in %s had its diskcache settings changed (%s); entries may have been evicted: "
            "bigjob's settings are back, and what is missing is computed again", root, ", ".join(changed),
        )


def remove_database(root: str | os.PathLike[str]) -> None:
    """Deletes the database of cache folder ``root``: ``bigjob-cache clear`` on one that cannot be opened.

    A folder of another user or open to others is refused (CacheError) as
    :class:`~bigjob.job.cache.JobCache` refuses it; the database folder is removed only when
    it holds diskcache's file. The offload folders and demo checkpoints go with
    :func:`bigjob.job.prune.remove_unused_folders`, which spares those running jobs use
    (their lock files stay with them).
    """
    root = Path(root)
    check_folder(root)
    database = root / "db"
    if (database / diskcache.core.DBNAME).is_file():
        shutil.rmtree(database)
