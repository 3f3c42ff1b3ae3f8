"""``bigjob-cache verify``: every entry and every byte of every offload folder checked; what is damaged is dropped.

A cache heals itself: a job that reuses a damaged offload folder finds it by the quick check
of its marker's checksums and rebuilds it. :func:`verify` finds all of them at once, by the
full check (every byte of every file, :func:`bigjob.engine.tiers.store.offload_problems` with
``full=True``), and repairs the cache:

* entries that cannot be read or have the wrong shape, and offload entries whose folder is
  gone (:meth:`bigjob.job.cache.JobCache.verify`);
* offload entries whose folder is damaged, or is not a folder of this cache (a registry
  entry pointing at an empty foreign folder): dropped;
* damaged offload folders of the cache (a shard, the marker or the index deleted, bytes
  flipped, a header's dtype relabelled, shards swapped between two folders): removed, unless
  a running job uses them (they are then listed as kept). The next job that needs one
  builds it again from the checkpoint.

Folders outside the cache are never touched, only the entries that name them.

>>> import tempfile
>>> from bigjob.job.cache import JobCache
>>> with JobCache(Path(tempfile.mkdtemp()) / "c") as cache:
...     cache.set("offload:" + "1" * 64, {"kind": "offload", "path": tempfile.mkdtemp()})
...     result = verify(cache)
>>> [reason.split(" (")[0][-19:] for _, reason in result.dropped]
['is not in the cache']
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bigjob.job.cache import JobCache
from bigjob.job.cache_locks import LOCK_TIMEOUT_S, use_lock
from bigjob.job.prune import exclusive_gate

__all__ = ["DamagedFolder", "VerifyResult", "verify"]


@dataclass(frozen=True)
class DamagedFolder:
    """An offload folder of the cache that failed the full check."""

    path: Path
    problems: tuple[str, ...]
    removed: bool
    kept_because: str = ""  # why it is still there: in use by a running job, or the file system refused


@dataclass
class VerifyResult:
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of every entry dropped
    damaged: list[DamagedFolder] = field(default_factory=list)
    orphans: list[Path] = field(default_factory=list)  # registry folders no entry names

    @property
    def kept(self) -> list[DamagedFolder]:
        return [folder for folder in self.damaged if not folder.removed]


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _offload_folders(cache: JobCache) -> list[Path]:
    """Every finished-looking offload folder of the cache: ``offload/<fingerprint>/offload-*`` (no temporaries)."""
    if not cache.offload_root.is_dir():
        return []
    return sorted(p for registry in cache.offload_root.iterdir() if registry.is_dir() and not registry.is_symlink()
                  for p in registry.glob("offload-*") if p.is_dir() and not p.is_symlink())


def verify(cache: JobCache, wait: float = LOCK_TIMEOUT_S) -> VerifyResult:
    """Checks every entry and every offload folder of ``cache`` byte by byte; drops and removes the damaged ones."""
    from bigjob.engine.tiers.store import offload_problems

    result = VerifyResult(dropped=cache.verify())
    registry = {key: Path(str(value["path"])) for key, value in cache.entries() if key.startswith("offload:")}
    problems: dict[Path, list[str]] = {}
    for path in sorted(set(_offload_folders(cache)) | set(registry.values())):
        found = offload_problems(path, full=True)  # reads every byte: outside the gate, jobs go on meanwhile
        if found:
            problems[path] = found
    for key, path in sorted(registry.items()):
        if not _inside(path, cache.offload_root):
            reason = f"offload folder {path} is not in the cache" + (f" ({'; '.join(problems[path])})" if path in problems else "")
        elif path in problems:
            reason = f"offload folder {path} is damaged"
        else:
            continue
        cache.delete(key)
        result.dropped.append((key, reason))
    damaged = [path for path in problems if _inside(path, cache.offload_root)]
    if damaged:
        with exclusive_gate(cache.root, wait):  # no job chooses a folder while one is removed
            checked = (_remove(cache, path, problems[path]) for path in damaged)
            result.damaged = [folder for folder in checked if folder is not None]
    dropped = {key for key, _ in result.dropped}
    named = {path.parent for key, path in registry.items() if key not in dropped}
    if cache.offload_root.is_dir():
        result.orphans = sorted(p for p in cache.offload_root.iterdir() if p.is_dir() and p not in named)
    return result


def _remove(cache: JobCache, path: Path, problems: list[str]) -> DamagedFolder | None:
    """Removes the damaged offload folder ``path`` unless a job uses it (its registry folder's use lock is held).

    None when a job rebuilt it since it was checked: it is sound now.
    """
    from bigjob.engine.tiers.store import offload_problems

    lock = use_lock(cache.root, path.parent, shared=False)
    if not lock.try_acquire():
        return DamagedFolder(path, tuple(problems), False, "in use by a running job")
    try:
        if path.is_dir() and not offload_problems(path, full=True):
            return None
        try:
            shutil.rmtree(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            return DamagedFolder(path, tuple(problems), False, f"{err.filename or path}: {err.strerror or err}")
        try:
            path.parent.rmdir()  # the registry folder, when nothing else is in it
        except OSError:
            pass
        return DamagedFolder(path, tuple(problems), True)
    finally:
        lock.release()
