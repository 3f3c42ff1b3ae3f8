"""The job cache: device maps and registries as JSON in diskcache, big artifacts as folders.

Layout of a cache folder (created 0700, refused when another user owns it or others may
write it, since its content decides what a job loads)::

    <root>/db/            diskcache (SQLite) with JSONDisk: JSON values, never pickles
    <root>/offload/<fp>/  offload folders, one per offload fingerprint
    <root>/checkpoints/   the demo model's seeded checkpoints
    <root>/locks/         lock files (``flock``) of compute-once sections, and the use locks
                          that keep pruning off the folders running jobs use

Every folder bigjob creates here is 0700.

Keys are strings ``"<kind>:<sha256>"`` with kind ``plan``, ``offload``, ``run`` or ``working``
(a forward's estimated working memory, ``placement.working_memory=auto``); values
are JSON objects carrying their own ``kind``. Nothing is evicted behind the user's back
(``eviction_policy="none"``); :meth:`JobCache.verify` drops entries that cannot be read
or do not have the shape their kind needs.

diskcache's default disk pickles values, and a pickle runs code when read: anyone able to
write the folder could run code in every job (CVE-2025-69872). :class:`SafeJSONDisk` stores
JSON text and, unlike diskcache's own ``JSONDisk``, also refuses to read a row that claims
to be a pickle (a tampered database cannot smuggle one in). Values are kept inside the
SQLite file (no value files), so a row is all there is to check.

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
import stat
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import diskcache

from bigjob.errors import CacheError

__all__ = [
    "KINDS",
    "FileLock",
    "JobCache",
    "SafeJSONDisk",
    "default_cache_dir",
    "gate_lock",
    "is_cache_key",
    "make_private_dirs",
    "remove_database",
    "use_lock",
]

logger = logging.getLogger(__name__)

KINDS = ("plan", "offload", "run", "working")
_KEY = re.compile(r"^(plan|offload|run|working):[0-9a-f]{64}$")
# What reading a damaged entry raises (zlib, JSON, a vanished value file).
_UNREADABLE = (ValueError, TypeError, OSError, UnicodeDecodeError, zlib.error)
# How long to wait for a lock that a live process holds (one building a big offload folder).
# A holder that dies, even by SIGKILL, releases its lock at once: the kernel drops its flock.
LOCK_TIMEOUT_S = 4 * 3600
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


def default_cache_dir() -> Path:
    """``$BIGJOB_CACHE_DIR``, else ``$XDG_CACHE_HOME/bigjob``, else ``~/.cache/bigjob``."""
    if os.environ.get("BIGJOB_CACHE_DIR"):
        return Path(os.environ["BIGJOB_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bigjob"


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


def make_private_dirs(path: str | os.PathLike[str]) -> Path:
    """Creates ``path`` and its missing parents, each 0700 (``mkdir -p`` would leave parents 0755)."""
    path = Path(path)
    missing = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:
            pass  # made meanwhile by a concurrent job
    return path


class FileLock:
    """A cross-process lock: ``flock`` on a file, released by the kernel when its holder dies.

    diskcache's ``Lock`` is a row with an expiry: a holder killed by SIGKILL blocks every
    other job until it expires. A kernel lock has no such window and needs no clock.
    Waiting longer than ``timeout`` seconds raises :class:`CacheError` naming the holder.
    ``shared`` locks (readers: jobs using a folder) exclude only exclusive ones (the writer
    that would delete it); :meth:`try_acquire` takes a lock only if it is free now.

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.lock"
    >>> with FileLock(path, timeout=1) as lock:
    ...     lock.held, FileLock(path).try_acquire()
    (True, False)
    >>> with FileLock(path, shared=True), FileLock(path, shared=True) as other:
    ...     other.held, FileLock(path).try_acquire()
    (True, False)
    """

    POLL_S = 0.05

    def __init__(self, path: str | os.PathLike[str], timeout: float = LOCK_TIMEOUT_S, shared: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.shared = shared
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as err:
            raise CacheError(f"cannot create the lock file {str(self.path)!r} ({err.strerror}); set cache.dir to a writable folder") from None

    def _lock(self, fd: int) -> bool:
        """Takes the lock on ``fd`` if it is free now; False when another process holds it."""
        import fcntl

        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as err:  # a filesystem without flock
            raise CacheError(f"cannot lock {str(self.path)!r} ({err.strerror}); set cache.dir to a folder on a local disk") from None
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)  # for the message of a waiter that gives up
        return True

    def try_acquire(self) -> bool:
        """Takes the lock if no other holder prevents it now (no waiting); release with :meth:`release`."""
        fd = self._open()
        try:
            taken = self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        if taken:
            self._fd = fd
        else:
            os.close(fd)
        return taken

    def __enter__(self) -> FileLock:
        fd = self._open()
        deadline = time.monotonic() + self.timeout
        try:
            while not self._lock(fd):
                if time.monotonic() > deadline:
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
                    raise CacheError(
                        f"waited {self.timeout:.0f} s for the lock {str(self.path)!r}, held by the live process {holder}; "
                        "let that job finish, or set cache.dir to another folder"
                    ) from None
                time.sleep(self.POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the last descriptor releases the flock

    def __exit__(self, *exc: object) -> None:
        self.release()


def gate_lock(root: str | os.PathLike[str], shared: bool = True, timeout: float = LOCK_TIMEOUT_S) -> FileLock:
    """The lock between choosing artifact folders in cache ``root`` and deleting them (:mod:`bigjob.job.prune`).

    A job holds it shared while it picks its folders and takes their :func:`use_lock`;
    pruning holds it exclusively, so no folder is chosen while it is being removed.
    """
    return FileLock(make_private_dirs(Path(root) / "locks") / "prune.lock", timeout, shared=shared)


def use_lock(root: str | os.PathLike[str], folder: str | os.PathLike[str], shared: bool = True) -> FileLock:
    """A shared lock saying a job uses ``folder``, an offload folder or demo checkpoint of cache ``root``.

    Pruning removes a folder only while it holds this lock exclusively (``shared=False``).
    The folder need not exist yet: a job takes the lock before building it. Needs no
    database, so jobs with ``cache.enabled=false`` protect the demo checkpoint they keep in
    the cache folder too.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> use_lock(root, root / "offload" / "ab").path.name
    'use-offload-ab.lock'
    """
    root = Path(root).expanduser().absolute()
    relative = Path(folder).expanduser().absolute().relative_to(root)
    name = "use-" + re.sub(r"[^A-Za-z0-9_.-]", "-", "-".join(relative.parts)) + ".lock"
    return FileLock(make_private_dirs(root / "locks") / name, shared=shared)


def remove_database(root: str | os.PathLike[str]) -> None:
    """Deletes the database of cache folder ``root``: ``bigjob-cache clear`` on one that cannot be opened.

    A folder of another user or open to others is refused (CacheError) as :class:`JobCache`
    refuses it; the database folder is removed only when it holds diskcache's file. The
    offload folders and demo checkpoints go with :func:`bigjob.job.prune.remove_unused_folders`,
    which spares those running jobs use (their lock files stay with them).
    """
    import shutil

    root = Path(root)
    _check_folder(root)
    database = root / "db"
    if (database / diskcache.core.DBNAME).is_file():
        shutil.rmtree(database)


def _check_folder(root: Path) -> None:
    """Creates ``root`` 0700, or checks that an existing one is ours and closed to writers."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = root.stat()
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {str(root)!r} ({err.strerror}); set cache.dir to a writable folder") from None
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"cache folder {str(root)!r} is not a folder; set cache.dir to a folder")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise CacheError(
            f"cache folder {str(root)!r} belongs to another user (uid {info.st_uid}); its content would decide what "
            "this job loads, so it is refused: set cache.dir to a folder of your own"
        )
    if info.st_mode & 0o022:
        raise CacheError(
            f"cache folder {str(root)!r} is writable by others (mode {oct(info.st_mode & 0o777)}); "
            "run `chmod 700` on it or set cache.dir to a private folder"
        )
    if info.st_mode & 0o077:
        os.chmod(root, 0o700)


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
        _check_folder(self.root)
        try:
            (self.root / "db").mkdir(mode=0o700, exist_ok=True)  # diskcache would make it 0755
            self._db = diskcache.Cache(
                str(self.root / "db"),
                disk=SafeJSONDisk,
                eviction_policy="none",
                disk_min_file_size=2**31,  # every value inside SQLite: no value files
                size_limit=2**62,
                timeout=DB_TIMEOUT_S,
            )
        except (sqlite3.DatabaseError, OSError) as err:
            raise CacheError(
                f"cannot open the cache database in {str(self.root)!r} ({err}); "
                f"run `bigjob-cache clear --dir {self.root}` or set cache.dir to another folder"
            ) from None

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
            except _UNREADABLE as err:
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
            except _UNREADABLE as err:
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
            except _UNREADABLE as err:
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
