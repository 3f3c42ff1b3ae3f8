"""The job cache's database: diskcache (SQLite) that stores JSON and refuses to unpickle.

diskcache's default disk pickles values, and a pickle runs code when read: anyone able to
write the folder could run code in every job (CVE-2025-69872). :class:`SafeJSONDisk` stores
JSON text and, unlike diskcache's own ``JSONDisk``, also refuses to read a row that claims
to be a pickle (a tampered database cannot smuggle one in). Values are kept inside the
SQLite file (no value files), so a row is all there is to check. Nothing is evicted behind
the user's back (``eviction_policy="none"``).

>>> import tempfile
>>> db = open_database(Path(tempfile.mkdtemp()) / "c")
>>> db.set("plan:x", {"kind": "plan"}); db.get("plan:x")
True
{'kind': 'plan'}
>>> db.close()
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import zlib
from pathlib import Path
from typing import Any

import diskcache

from bigjob.errors import CacheError
from bigjob.job.cache_folder import check_folder

__all__ = ["DB_TIMEOUT_S", "UNREADABLE", "SafeJSONDisk", "open_database", "remove_database"]

# What reading a damaged entry raises (zlib, JSON, a vanished value file).
UNREADABLE = (ValueError, TypeError, OSError, UnicodeDecodeError, zlib.error)
# How long to wait for SQLite's own lock before diskcache gives up.
DB_TIMEOUT_S = 60


class SafeJSONDisk(diskcache.JSONDisk):
    """JSON keys and values; a row stored as a pickle is refused instead of unpickled."""

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
        return diskcache.Cache(
            str(root / "db"),
            disk=SafeJSONDisk,
            eviction_policy="none",
            disk_min_file_size=2**31,  # every value inside SQLite: no value files
            size_limit=2**62,
            timeout=DB_TIMEOUT_S,
        )
    except (sqlite3.DatabaseError, OSError) as err:
        raise CacheError(
            f"cannot open the cache database in {str(root)!r} ({err}); "
            f"run `bigjob-cache clear --dir {root}` or set cache.dir to another folder"
        ) from None


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
