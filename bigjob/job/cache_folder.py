"""The job cache's folder: where it is, its layout, and the checks that keep it private.

Layout of a cache folder (created 0700, refused when another user owns it or others may
write it, since its content decides what a job loads)::

    <root>/db/            diskcache (SQLite) with JSON values, never pickles (:mod:`bigjob.job.cache_db`)
    <root>/offload/<fp>/  offload folders, one per offload fingerprint
    <root>/checkpoints/   the demo model's seeded checkpoints
    <root>/locks/         lock files (``flock``) of compute-once sections, and the use locks
                          that keep pruning off the folders running jobs use (:mod:`bigjob.job.cache_locks`)

Every folder bigjob creates here is 0700.

>>> import tempfile
>>> root = make_private_dirs(Path(tempfile.mkdtemp()) / "a" / "b")
>>> check_folder(root); oct(root.stat().st_mode & 0o777), oct(root.parent.stat().st_mode & 0o777)
('0o700', '0o700')
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from bigjob.errors import CacheError

__all__ = ["check_folder", "default_cache_dir", "make_private_dirs"]

_LAYOUT = {"db", "offload", "checkpoints", "locks"}


def default_cache_dir() -> Path:
    """``$BIGJOB_CACHE_DIR``, else ``$XDG_CACHE_HOME/bigjob``, else ``~/.cache/bigjob``."""
    if os.environ.get("BIGJOB_CACHE_DIR"):
        return Path(os.environ["BIGJOB_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bigjob"


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


def check_folder(root: Path) -> None:
    """Creates ``root`` 0700, or checks that an existing one is ours and closed to writers (CacheError if not)."""
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
    _check_writable(root)
    if info.st_mode & 0o077 and _is_bigjobs(root):  # a folder holding other things keeps its mode (cache.dir=/etc)
        os.chmod(root, 0o700)


def _check_writable(root: Path) -> None:
    """Creates and removes a file in ``root``: a folder no one can write (``/proc``, a read-only mount) is refused.

    The mode bits do not tell (root may write anywhere the mode forbids, and nowhere in /proc).
    """
    probe = root / f".bigjob-write-test-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        probe.unlink()
    except FileExistsError:
        probe.unlink(missing_ok=True)
    except OSError as err:
        raise CacheError(f"cache.dir={root} is not writable (creating a file there failed: {err.strerror}); choose another cache.dir") from None


def _is_bigjobs(root: Path) -> bool:
    """Whether ``root`` holds nothing but what bigjob puts in a cache folder (an empty folder included)."""
    try:
        return all(entry.name in _LAYOUT for entry in os.scandir(root))
    except OSError:
        return False
