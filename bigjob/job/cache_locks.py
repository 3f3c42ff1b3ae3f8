"""Locks of the job cache: ``flock`` on files in ``<root>/locks``, released by the kernel when a holder dies.

Three kinds share :class:`FileLock`: compute-once sections (:meth:`bigjob.job.cache.JobCache.lock`),
the gate between choosing artifact folders and deleting them (:func:`gate_lock`), and the
use locks that keep pruning off the folders running jobs use (:func:`use_lock`).

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> with gate_lock(root) as gate, use_lock(root, root / "offload" / "ab") as use:
...     gate.held, use.held, use_lock(root, root / "offload" / "ab", shared=False).try_acquire()
(True, True, False)
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from bigjob.errors import CacheError
from bigjob.job.cache_folder import make_private_dirs

__all__ = ["LOCK_TIMEOUT_S", "FileLock", "gate_lock", "use_lock"]

# How long to wait for a lock that a live process holds (one building a big offload folder).
# A holder that dies, even by SIGKILL, releases its lock at once: the kernel drops its flock.
LOCK_TIMEOUT_S = 4 * 3600

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
