"""Keeping a cache folder within a size: the least recently used offload folders and demo checkpoints go first.

Offload folders (a model's disk tier converted to the job's dtype: gigabytes each, one per
budget and dtype of a sweep) and demo checkpoints are nearly all of a cache's bytes; plans
and registry entries are a few KiB each and are kept. Nothing is removed unless asked:
``bigjob-cache prune --max-size 50GB --older-than 14d``, or ``cache.max_size``, which prunes
before a job builds an offload folder (making room for it) and at the end of every job.

* **Last use** is an artifact folder's modification time: a job touches each folder it
  uses, whether it built it or found it built.
* **In use** folders are never removed. A job takes a shared use lock on each folder it
  will use, from the moment it chooses it (before building it) to its end; pruning removes a
  folder only while it holds that lock exclusively. Choosing and removing are kept apart by
  the cache's gate (:func:`bigjob.job.cache_locks.gate_lock`), so a job never picks a folder that is being removed.
* A removed offload folder takes the registry entries that point into it along; the next job
  needing it builds it again. Temporary folders of builds that were killed go with their
  artifact (they are counted in its size).

>>> import tempfile
>>> from bigjob.job.cache import JobCache
>>> cache = JobCache(Path(tempfile.mkdtemp()) / "cache")
>>> old = cache.offload_root / ("a" * 64)
>>> _ = old.mkdir(parents=True), (old / "w.safetensors").write_bytes(bytes(1000)), os.utime(old, (0, 0))
>>> new = cache.offload_root / ("b" * 64)
>>> _ = new.mkdir(), (new / "w.safetensors").write_bytes(bytes(1000))
>>> result = prune(cache, older_than=parse_age("30d"))
>>> [a.path.name[:4] for a in result.removed], old.exists(), new.exists()
(['aaaa'], False, True)
>>> cache.close()
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bigjob.errors import CacheError
from bigjob.job.cache import JobCache
from bigjob.job.cache_locks import LOCK_TIMEOUT_S, FileLock, gate_lock, use_lock

__all__ = ["Artifact", "PruneResult", "artifacts", "clear", "exclusive_gate", "parse_age", "prune", "remove_unused_folders", "touch"]

_AGE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*$", re.IGNORECASE)
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DEMO_TEMP = re.compile(r"^\.(demo-[0-9a-f]+)-")


@dataclass(frozen=True)
class Artifact:
    """One removable thing: an offload folder or a demo checkpoint, with its leftover temporaries."""

    path: Path  # the folder its users name (it may be gone, with only temporaries left)
    kind: str  # "offload" or "checkpoint"
    parts: tuple[Path, ...]  # what exists of it on disk: the folder and temporaries of its builds
    size: int  # bytes of every file in ``parts``
    last_used: float  # the latest modification time of ``parts``, seconds since the epoch


@dataclass
class PruneResult:
    """What :func:`prune` removed (or with ``dry_run`` would remove) and what it had to keep."""

    removed: list[Artifact] = field(default_factory=list)
    in_use: list[Artifact] = field(default_factory=list)  # chosen for removal, but a job uses them
    failed: list[tuple[Artifact, str]] = field(default_factory=list)  # removal refused by the file system
    entries_removed: int = 0
    size_before: int = 0
    size_after: int = 0
    dry_run: bool = False

    @property
    def freed(self) -> int:
        return sum(a.size for a in self.removed)


def parse_age(value: str | float, key: str = "--older-than") -> float:
    """Seconds from an age such as ``"14d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"2w"`` or a number of seconds.

    >>> parse_age("14d"), parse_age("1.5h"), parse_age(90)
    (1209600.0, 5400.0, 90.0)
    >>> parse_age("two weeks")
    Traceback (most recent call last):
    ...
    bigjob.errors.CacheError: cannot read 'two weeks' as an age for --older-than; write a number with a unit s, m, h, d or w, such as '14d'
    """
    if isinstance(value, bool):
        raise CacheError(f"cannot read {value!r} as an age for {key}; write a number with a unit s, m, h, d or w, such as '14d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _AGE.match(str(value))
        if not match:
            raise CacheError(f"cannot read {value!r} as an age for {key}; write a number with a unit s, m, h, d or w, such as '14d'")
        seconds = float(match.group(1)) * _SECONDS[match.group(2).lower()]
    if not math.isfinite(seconds) or seconds < 0:
        raise CacheError(f"age {value!r} for {key} must be a finite number of seconds, at least 0")
    return seconds


def touch(folder: str | os.PathLike[str]) -> None:
    """Marks ``folder`` as used now (its modification time); a folder that is gone is left alone."""
    try:
        os.utime(folder)
    except OSError:
        pass


def _measure(paths: list[Path]) -> tuple[int, float]:
    """Bytes of the files under ``paths`` and the latest modification time among the paths themselves."""
    size, latest = 0, 0.0
    for path in paths:
        try:
            latest = max(latest, path.stat().st_mtime)
        except OSError:
            continue
        for folder, _, files in os.walk(path):
            for name in files:
                try:
                    info = os.lstat(os.path.join(folder, name))
                except OSError:
                    continue
                size += info.st_size
    return size, latest


def _candidates(root: Path) -> Iterator[tuple[str, Path, list[Path]]]:
    """(kind, folder, parts) of every artifact folder of cache ``root``, with the temporaries each one owns."""
    offload_root, checkpoints_root = root / "offload", root / "checkpoints"
    if offload_root.is_dir():
        for path in sorted(offload_root.iterdir()):  # one folder per offload fingerprint
            if path.is_dir() and not path.is_symlink():
                yield "offload", path, [path]
    if checkpoints_root.is_dir():
        groups: dict[str, list[Path]] = {}
        for path in sorted(checkpoints_root.iterdir()):
            if not path.is_dir() or path.is_symlink():
                continue
            temporary = _DEMO_TEMP.match(path.name)  # a build in progress or killed: it belongs to its checkpoint
            name = temporary.group(1) if temporary else path.name
            groups.setdefault(name, []).append(path)
        for name, parts in groups.items():
            yield "checkpoint", checkpoints_root / name, parts


def artifacts(cache: JobCache | str | os.PathLike[str]) -> list[Artifact]:
    """The offload folders and demo checkpoints of a cache (open, or its folder), least recently used first."""
    root = cache.root if isinstance(cache, JobCache) else Path(cache).expanduser().absolute()
    found = []
    for kind, path, parts in _candidates(root):
        size, last_used = _measure(parts)
        found.append(Artifact(path, kind, tuple(parts), size, last_used))
    return sorted(found, key=lambda a: (a.last_used, str(a.path)))


def _inside(path: str, folder: Path) -> bool:
    return Path(path) == folder or folder in Path(path).parents


def _offload_entries(cache: JobCache) -> dict[str, str]:
    """The folder path each offload entry names, by key (read once: a cache may hold thousands of plans)."""
    paths = {}
    for key in cache.keys():
        if key.startswith("offload:"):
            value = cache.get(key)
            if value is not None:
                paths[key] = str(value.get("path", ""))
    return paths


def _forget(cache: JobCache, artifact: Artifact, registry: dict[str, str]) -> int:
    """Removes the registry entries pointing into ``artifact``; returns how many."""
    entries = 0
    for key, path in list(registry.items()):
        if _inside(path, artifact.path):
            entries += cache.delete(key)
            del registry[key]
    return entries


def _remove_parts(artifact: Artifact) -> str | None:
    """Removes the folders of ``artifact``; the first error, or None."""
    for part in artifact.parts:
        try:
            shutil.rmtree(part)
        except FileNotFoundError:
            pass
        except OSError as err:  # a file another user made, a read-only mount
            return f"{err.filename or part}: {err.strerror or err}"
    return None


@contextlib.contextmanager
def _unused(root: Path, artifact: Artifact) -> Iterator[bool]:
    """Holds the use lock of ``artifact`` exclusively if no job holds it; yields whether it does.

    Call under the gate: no job can then be waiting on the lock, so once the artifact's
    folders are gone its lock file goes too.
    """
    lock = use_lock(root, artifact.path, shared=False)
    if not lock.try_acquire():
        yield False
        return
    try:
        yield True
        if not any(part.exists() for part in artifact.parts):
            lock.path.unlink(missing_ok=True)
    finally:
        lock.release()


def prune(
    cache: JobCache,
    max_size: int | None = None,
    older_than: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
    wait: float = LOCK_TIMEOUT_S,
) -> PruneResult:
    """Removes artifacts unused for ``older_than`` seconds, then the least recently used until the cache fits ``max_size`` bytes.

    ``max_size`` counts the whole cache folder (database and locks too). Folders that jobs
    use are kept, even when the cache stays above ``max_size``; they are listed in
    ``in_use``. With ``dry_run`` nothing is removed and the result says what would be.
    ``wait`` bounds the wait for jobs that are choosing their folders right now.
    """
    if max_size is None and older_than is None:
        raise CacheError("pruning needs a limit: a maximum size (--max-size, cache.max_size) or an age (--older-than)")
    now = time.time() if now is None else now
    result = PruneResult(dry_run=dry_run)
    with exclusive_gate(cache.root, wait):
        result.size_before = total = cache.volume()
        registry = _offload_entries(cache)
        for artifact in artifacts(cache):
            stale = older_than is not None and now - artifact.last_used > older_than
            if not stale and (max_size is None or total <= max_size):
                continue
            with _unused(cache.root, artifact) as free:
                if not free:
                    result.in_use.append(artifact)
                    continue
                if not dry_run:
                    result.entries_removed += _forget(cache, artifact, registry)
                    error = _remove_parts(artifact)
                    if error is not None:
                        result.failed.append((artifact, error))
                        continue
                result.removed.append(artifact)
                total -= artifact.size
        if not dry_run:
            _drop_idle_locks(cache.root)
            if result.entries_removed:
                cache.compact()
        result.size_after = total if dry_run else cache.volume()
    return result


def clear(cache: JobCache, wait: float = LOCK_TIMEOUT_S) -> tuple[int, list[Artifact]]:
    """Removes every entry, and every offload folder and demo checkpoint that no running job uses.

    Returns the number of entries removed and the folders kept because jobs use them (their
    entries go all the same; a job registers its folder again, and the next job of the same
    plan finds it where its key says).
    """
    with exclusive_gate(cache.root, wait):
        kept = _remove_unused(cache.root)
        count = cache.clear()
        _drop_idle_locks(cache.root)
    return count, kept


def remove_unused_folders(root: str | os.PathLike[str], wait: float = LOCK_TIMEOUT_S) -> list[Artifact]:
    """Removes the offload folders and demo checkpoints of cache ``root`` that no running job uses, without
    its database (``bigjob-cache clear`` of a cache whose database cannot be opened); returns those kept."""
    root = Path(root).expanduser().absolute()
    with exclusive_gate(root, wait):
        kept = _remove_unused(root)
        _drop_idle_locks(root)
    return kept


def _remove_unused(root: Path) -> list[Artifact]:
    kept: list[Artifact] = []
    for artifact in artifacts(root):
        with _unused(root, artifact) as free:
            if free:
                _remove_parts(artifact)  # what the file system refuses stays, as `rm -rf` would leave it
            else:
                kept.append(artifact)
    for folder in (root / "offload", root / "checkpoints"):
        with contextlib.suppress(OSError):
            folder.rmdir()  # when empty
    return kept


@contextlib.contextmanager
def exclusive_gate(root: Path, wait: float) -> Iterator[None]:
    """The cache's gate, held exclusively: no job chooses a folder meanwhile."""
    gate = gate_lock(root, shared=False, timeout=wait)
    try:
        gate.__enter__()
    except CacheError:
        raise CacheError(
            f"the cache {str(root)!r} stayed busy for {wait:.0f} s (jobs choosing their folders, or another prune); "
            "nothing was removed: try again later"
        ) from None
    try:
        yield
    finally:
        gate.release()


def _drop_idle_locks(root: Path) -> None:
    """Deletes the use locks of folders that do not exist and that no job holds (under the gate, held exclusively).

    A job takes the lock of a folder it may never build (a plan served from the checkpoint
    needs no offload folder); without this their files would pile up in ``locks/``.
    """
    kept = {use_lock(root, a.path).path.name for a in artifacts(root)}
    for path in (root / "locks").glob("use-*.lock"):
        if path.name in kept:
            continue
        lock = FileLock(path)
        if lock.try_acquire():
            try:
                path.unlink(missing_ok=True)
            finally:
                lock.release()
