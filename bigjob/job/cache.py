"""The job cache: device maps and registries as JSON entries, big artifacts as folders.

:class:`JobCache` is one cache folder (:mod:`bigjob.job.cache_folder` lays it out and keeps
it private) with its database (:mod:`bigjob.job.cache_db`: JSON values, never pickles) and
its locks (:mod:`bigjob.job.cache_locks`).

Keys are strings ``"<kind>:<sha256>"`` with kind ``plan``, ``offload``, ``run`` or ``working``
(a forward's estimated working memory, ``placement.working_memory=auto``); values
are JSON objects carrying their own ``kind``. Nothing is evicted behind the user's back;
:meth:`JobCache.verify` drops entries that cannot be read or do not have the shape their
kind needs.

>>> import tempfile
>>> cache = JobCache(Path(tempfile.mkdtemp()) / "c")
>>> value, hit = cache.compute_once("plan:" + "0" * 64, lambda: {"kind": "plan", "device_map": {"": "cpu"}})
>>> hit, cache.compute_once("plan:" + "0" * 64, lambda: {})[1]
(False, True)
>>> cache.close()
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import diskcache

from bigjob.errors import CacheError
from bigjob.job.cache_db import DB_TIMEOUT_S, UNREADABLE, open_database
from bigjob.job.cache_folder import make_private_dirs
from bigjob.job.cache_locks import LOCK_TIMEOUT_S, FileLock

__all__ = ["KINDS", "JobCache", "is_cache_key"]

logger = logging.getLogger(__name__)

KINDS = ("plan", "offload", "run", "working")
_KEY = re.compile(r"^(plan|offload|run|working):[0-9a-f]{64}$")


def is_cache_key(key: object) -> bool:
    """Whether ``key`` has the form ``"<kind>:<sha256 hex>"``.

    >>> is_cache_key("plan:" + "a" * 64), is_cache_key("plan:xyz"), is_cache_key(3)
    (True, False, False)
    """
    return isinstance(key, str) and bool(_KEY.match(key))


def _covers(held: Sequence[str], needed: Sequence[str]) -> bool:
    """Whether every device-map key of ``needed`` is one of ``held`` or inside one of them.

    >>> _covers(["model.layers.3", "model.layers.4"], ["model.layers.4"]), _covers(["model"], ["model.layers.4"])
    (True, True)
    >>> _covers(["model.layers.4"], ["model.layers.3"]), _covers(["model.layers.1"], ["model.layers.10"])
    (False, False)
    """
    return all(any(h in ("", n) or n.startswith(h + ".") for h in held) for n in needed)


def _check_value(key: str, value: Any) -> str | None:
    """Why a stored value is unusable, or None when it has the shape its kind needs."""
    kind = key.split(":", 1)[0]
    if not isinstance(value, dict) or value.get("kind") != kind:
        return f"not a {kind} entry"
    if kind == "plan":
        device_map = value.get("device_map")
        if not isinstance(device_map, dict) or not device_map:
            return "no device_map"
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in device_map.items()):
            return "device_map is not a map of names to devices"
    elif kind == "offload":
        if not isinstance(value.get("path"), str):
            return "no path"
    elif kind == "run":
        if not isinstance(value.get("run_dir"), str):
            return "no run_dir"
    elif kind == "working":
        nbytes = value.get("bytes")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            return "no bytes"
    return None


class JobCache:
    """One cache folder. Open it only once a job's inputs are known to be valid."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self._db = open_database(self.root)

    @contextlib.contextmanager
    def _database(self) -> Iterator[None]:
        """SQLite's errors (a database damaged after it was opened, a lock held too long) as a CacheError."""
        try:
            yield
        except sqlite3.DatabaseError as err:
            raise CacheError(
                f"cannot use the cache database in {str(self.root)!r} ({err}); if it is damaged, run "
                f"`bigjob-cache clear --dir {self.root}`, or set cache.dir to another folder"
            ) from None

    # ------------------------------------------------------------------ folders
    @property
    def offload_root(self) -> Path:
        return self.root / "offload"

    @property
    def checkpoints_root(self) -> Path:
        return self.root / "checkpoints"

    def offload_dir(self, fingerprint: str) -> Path:
        """The registry folder for an offload fingerprint (not created here)."""
        return self.offload_root / fingerprint

    # ------------------------------------------------------------------ entries
    def get(self, key: str) -> dict[str, Any] | None:
        """The entry under ``key``, or None when absent or unreadable (it is then dropped)."""
        with self._database():
            try:
                value = self._db.get(key, default=None, retry=True)
            except UNREADABLE as err:
                logger.warning("dropping unreadable cache entry %s: %s", key, err)
                self._db.delete(key, retry=True)
                return None
            if value is None:
                return None
            problem = _check_value(key, value)
            if problem:
                logger.warning("dropping malformed cache entry %s: %s", key, problem)
                self._db.delete(key, retry=True)
                return None
            return value

    def set(self, key: str, value: dict[str, Any]) -> None:
        """Stores a JSON-able entry; the key must be ``"<kind>:<sha256>"``."""
        if not is_cache_key(key):
            raise CacheError(f"cache key {key!r} is not '<kind>:<sha256 hex>' with kind in {KINDS}")
        problem = _check_value(key, value)
        if problem:
            raise CacheError(f"refusing to store a malformed entry under {key}: {problem}")
        try:
            with self._database():
                self._db.set(key, value, retry=True)
        except TypeError as err:  # not JSON-able: never fall back to pickling
            raise CacheError(f"cache entry {key} is not JSON: {err}") from None

    def delete(self, key: str) -> bool:
        with self._database():
            return bool(self._db.delete(key, retry=True))

    @contextlib.contextmanager
    def _sql(self) -> Iterator[sqlite3.Connection]:
        """A connection of its own to the database file, committed and closed after the block."""
        with self._database(), contextlib.closing(
            sqlite3.connect(os.path.join(self._db.directory, diskcache.core.DBNAME), timeout=DB_TIMEOUT_S)
        ) as con, con:
            yield con

    def _rows(self) -> list[tuple[int, Any, bool]]:
        """(rowid, stored key, raw flag) of every row, read without decoding anything."""
        with self._sql() as con:
            return [(r[0], r[1], bool(r[2])) for r in con.execute("SELECT rowid, key, raw FROM Cache")]

    def _delete_row(self, rowid: int) -> None:
        with self._sql() as con:
            con.execute("DELETE FROM Cache WHERE rowid = ?", (rowid,))

    def compact(self) -> None:
        """Gives the database's write-ahead log back to the file system (it keeps its largest size otherwise)."""
        with self._sql() as con:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _decoded_keys(self) -> tuple[list[str], list[tuple[int, str]]]:
        """Readable string keys, and (rowid, reason) of rows whose key cannot be read."""
        disk = self._db.disk
        keys, bad = [], []
        for rowid, stored, raw in self._rows():
            try:
                key = disk.get(stored, raw)
            except UNREADABLE as err:
                bad.append((rowid, f"unreadable key ({err})"))
                continue
            if isinstance(key, str):
                keys.append(key)
            else:
                bad.append((rowid, f"key {key!r} is not a string"))
        return sorted(keys), bad

    def keys(self) -> list[str]:
        """Every readable key, sorted (locks included)."""
        return self._decoded_keys()[0]

    def entries(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every readable entry, sorted by key (unreadable ones are dropped on the way)."""
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                yield key, value

    def offload_holding(self, family: str, disk_modules: Sequence[str]) -> Path | None:
        """The registry folder of a built offload folder that holds every tensor of ``disk_modules``.

        ``family`` keys everything an offload folder's content depends on except which modules
        are on disk (checkpoint, tensors, dtypes, offload_buffers). A plan with a larger budget
        puts a subset of another plan's disk modules on disk: that plan's folder already holds
        them, converted the same way, and the engine serves the subset from it as it is
        (:func:`bigjob.engine.tiers.store.prepare_offload_folder`). Of several, the one with the
        fewest disk modules; None when there is none (or its folder predates the records the
        engine checks).
        """
        from bigjob.engine.tiers.store import offload_marker

        best: tuple[int, Path] | None = None
        for key, entry in self.entries():
            if not key.startswith("offload:") or entry.get("family") != family:
                continue
            held, path = entry.get("disk_modules"), Path(str(entry.get("path", "")))
            if not isinstance(held, list) or not _covers(held, disk_modules):
                continue
            marker = offload_marker(path)
            if marker is None or "entries" not in marker:
                continue
            if best is None or len(held) < best[0]:
                best = (len(held), path.parent)
        return None if best is None else best[1]

    def lock(self, name: str, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
        """A cross-process lock named ``name``; a holder that dies releases it at once."""
        folder = make_private_dirs(self.root / "locks")
        return FileLock(folder / (re.sub(r"[^A-Za-z0-9_.-]", "-", name) + ".lock"), timeout)

    def compute_once(
        self, key: str, compute: Callable[[], dict[str, Any]], timeout: float = LOCK_TIMEOUT_S
    ) -> tuple[dict[str, Any], bool]:
        """``(value, hit)``: the entry under ``key``, computing and storing it at most once.

        Concurrent callers with the same key wait on a lock while the first computes;
        they then read its result and report a hit.
        """
        value = self.get(key)
        if value is not None:
            return value, True
        with self.lock(key, timeout=timeout):
            value = self.get(key)
            if value is not None:
                return value, True
            value = compute()
            value.setdefault("created", time.time())
            self.set(key, value)
            return value, False

    # ------------------------------------------------------------------ maintenance
    def verify(self) -> list[tuple[str, str]]:
        """Drops corrupt entries and entries whose folder is gone; returns ``(key, reason)`` pairs."""
        with self._database():
            return self._verify()

    def _verify(self) -> list[tuple[str, str]]:
        keys, bad_rows = self._decoded_keys()
        dropped: list[tuple[str, str]] = []
        for rowid, reason in bad_rows:
            self._delete_row(rowid)
            dropped.append((f"row {rowid}", reason))
        for key in keys:
            if key.startswith("lock:"):
                continue
            if not is_cache_key(key):
                self._db.delete(key, retry=True)
                dropped.append((key, "key is not '<kind>:<sha256>'"))
                continue
            try:
                value = self._db.get(key, default=None, retry=True)
            except UNREADABLE as err:
                self._db.delete(key, retry=True)
                dropped.append((key, f"unreadable value ({err})"))
                continue
            problem = _check_value(key, value)
            if problem is None and key.startswith("offload:") and not Path(value["path"]).is_dir():
                problem = f"offload folder {value['path']} is gone"
            if problem:
                self._db.delete(key, retry=True)
                dropped.append((key, problem))
        return dropped

    def clear(self) -> int:
        """Removes every entry; returns how many. The folders go with :func:`bigjob.job.prune.clear`."""
        count = sum(1 for k in self.keys() if not k.startswith("lock:"))
        with self._database():
            self._db.clear(retry=True)
        self.compact()
        return count

    def volume(self) -> int:
        """Bytes on disk: the database plus artifact folders."""
        total = 0
        for path in self.root.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink():
                    total += path.stat().st_size
            except OSError:
                pass
        return total

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> JobCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
