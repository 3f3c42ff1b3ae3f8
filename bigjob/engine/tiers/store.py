"""Offload folders: disk-tier weights converted once to the target dtype and kept as safetensors.

Only weights that cannot be served from the checkpoint's own files (a dtype conversion,
or a PyTorch checkpoint) go here. A folder is identified by the fingerprint of what it
holds: the source checkpoint's identity, and the name, dtype and shape of every tensor.
It lives at ``<offload_folder>/offload-<fingerprint>``, is built under a temporary name,
gets a marker (written last, with the fingerprint and every file's size) and is renamed
into place only when complete. A folder whose marker is missing, different or does not
match its files is never used: it is rebuilt. A plan that needs a subset of a complete
folder's tensors (a larger CPU budget puts fewer layers on disk) uses that folder as it is:
the marker also records the source and every tensor, for that check. Nothing outside its
own ``offload-*`` and ``.tmp-offload-*`` entries under ``offload_folder`` is ever touched.

>>> import tempfile, torch
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> from bigjob.engine.checkpoints.opening import open_checkpoint
>>> root = Path(tempfile.mkdtemp())
>>> write_file(root / "model.safetensors", {"w": torch.ones(2, 2)})
>>> source = open_checkpoint(root / "model.safetensors")
>>> folder = prepare_offload_folder(root / "offload", source, [OffloadEntry("w", "w", torch.float16, (2, 2))])
>>> folder.reused, folder.checkpoint.load("w").dtype
(False, torch.float16)
>>> prepare_offload_folder(root / "offload", source, [OffloadEntry("w", "w", torch.float16, (2, 2))]).reused
True
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from bigjob.engine.checkpoints.checkpoint import Checkpoint

from bigjob.engine.checkpoints.opening import open_checkpoint
from bigjob.engine.checkpoints.safetensors_header import dtype_name
from bigjob.engine.checkpoints.safetensors_writer import SafetensorsWriter, layout_key
from bigjob.engine.plan.compression import scheme_id
from bigjob.engine.tiers.compressed_store import stored_nbytes, stored_tensors, stored_values
from bigjob.engine.tiers.checksums import file_checks, full_problem, quick_problem
from bigjob.errors import BigJobError, OffloadError

__all__ = [
    "OFFLOAD_FORMAT",
    "OffloadEntry",
    "OffloadFolder",
    "before_offload_build",
    "offload_fingerprint",
    "offload_marker",
    "offload_problems",
    "prepare_offload_folder",
]

log = logging.getLogger(__name__)

OFFLOAD_FORMAT = 1
MARKER = "bigjob-offload.json"
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 1 << 30
_BEFORE_BUILD: contextvars.ContextVar[Callable[[int], None] | None] = contextvars.ContextVar("before_offload_build", default=None)


class OffloadEntry(NamedTuple):
    """One tensor to offload: its name in the folder, its name in the source, target dtype and shape,
    and its compression (stored as parts then: :mod:`bigjob.engine.tiers.compressed_store`)."""

    name: str
    source_name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    compression: str = "none"


@dataclass(frozen=True)
class OffloadFolder:
    """A complete offload folder, opened for reading."""

    path: Path
    fingerprint: str
    reused: bool
    checkpoint: Checkpoint
    # (device, inode, size, mtime) of every file, by real path, as the check (or the build) vouched
    # for them: dispatch compares the files it maps with these (see bigjob.engine.tiers.sources).
    checked: dict[str, tuple[int, int, int, int]] = field(default_factory=dict, repr=False, compare=False)


@contextlib.contextmanager
def before_offload_build(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, :func:`prepare_offload_folder` calls ``callback(nbytes)`` before it builds a folder.

    ``nbytes`` is what the folder's tensors will take on disk. The callback may make room (a
    job cache removes least recently used folders) or raise to refuse; a folder that is
    reused calls nothing. Loading through :func:`~bigjob.engine.run.entry_points.load_checkpoint_and_dispatch`
    in the block covers the folders it builds.

    >>> import tempfile, torch
    >>> from bigjob.engine.checkpoints.safetensors_writer import write_file
    >>> from bigjob.engine.checkpoints.opening import open_checkpoint
    >>> root = Path(tempfile.mkdtemp())
    >>> write_file(root / "model.safetensors", {"w": torch.ones(4, 4)})
    >>> asked = []
    >>> with before_offload_build(asked.append):
    ...     _ = prepare_offload_folder(root / "offload", open_checkpoint(root / "model.safetensors"), [OffloadEntry("w", "w", torch.float16, (4, 4))])
    >>> asked
    [32]
    """
    token = _BEFORE_BUILD.set(callback)
    try:
        yield
    finally:
        _BEFORE_BUILD.reset(token)


def _described(entries: Sequence[OffloadEntry]) -> list[list]:
    """The entries as sorted JSON lists: name, source name, dtype name, shape (and a compression's id)."""
    extra = lambda e: [] if e.compression == "none" else [scheme_id(e.compression)]  # noqa: E731 - "none" keeps older folders' keys
    return sorted([e.name, e.source_name, dtype_name(e.dtype), list(e.shape), *extra(e)] for e in entries)


def offload_fingerprint(source_identity: dict, entries: Sequence[OffloadEntry]) -> str:
    """sha256 over the source's identity and every entry (name, source name, dtype, shape), order-free.

    >>> a = offload_fingerprint({"f": 1}, [OffloadEntry("w", "w", torch.float16, (2,))])
    >>> a == offload_fingerprint({"f": 1}, [OffloadEntry("w", "w", torch.bfloat16, (2,))])
    False
    """
    payload = {"format": OFFLOAD_FORMAT, "source": source_identity, "entries": _described(entries)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _superset(root: Path, source_identity: dict, entries: Sequence[OffloadEntry]) -> tuple[Path, str] | None:
    """The smallest complete folder under ``root`` holding every one of ``entries`` of the same source.

    A plan with a larger budget puts a subset of the layers on disk: the folder built for a
    smaller budget already holds them, converted the same way, and serves as it is (only the
    tensors asked for are viewed). Folders whose marker predates these fields are not considered.
    """
    wanted = {json.dumps(item) for item in _described(entries)}
    source = json.loads(json.dumps(source_identity))  # as a marker reads back (tuples become lists)
    best: tuple[int, Path, str] | None = None
    for folder in sorted(root.glob("offload-*")):
        marker = offload_marker(folder)
        if marker is None or marker.get("source") != source or not _complete(folder, marker):
            continue
        try:
            if not wanted <= {json.dumps(item) for item in marker["entries"]}:
                continue
            size = sum(int(n) for n in marker["files"].values())
        except (KeyError, TypeError, ValueError):
            continue
        if best is None or size < best[0]:
            best = (size, folder, marker["fingerprint"])
    return None if best is None else (best[1], best[2])


def offload_marker(folder: str | os.PathLike[str]) -> dict | None:
    """The marker of the offload folder ``folder`` (fingerprint, files, and for folders built since
    they were recorded, source and entries), or None where it is missing or unreadable."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def offload_problems(folder: str | os.PathLike[str], full: bool = False) -> list[str]:
    """What is wrong with the offload folder ``folder``, one line a problem; empty when it is sound.

    Every file the marker lists is checked against the checksums recorded when it was built
    (:mod:`bigjob.engine.tiers.checksums`): by size, header and sampled pages, and with
    ``full`` by every byte.

    >>> import tempfile
    >>> offload_problems(tempfile.mkdtemp())
    ['its marker bigjob-offload.json is missing or unreadable']
    """
    folder = Path(folder)
    marker = offload_marker(folder)
    if marker is None:
        return [f"its marker {MARKER} is missing or unreadable"]
    try:
        if marker.get("format") != OFFLOAD_FORMAT or not isinstance(marker.get("fingerprint"), str):
            return [f"its marker is not of format {OFFLOAD_FORMAT}"]
        files, checks = dict(marker["files"]), marker.get("checks")
        if not isinstance(checks, dict) or set(checks) != set(files):
            return ["its marker records no checksums (built by an older bigjob)"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return ["its marker is malformed"]
    problem = full_problem if full else quick_problem
    found = []
    for name in sorted(files):
        why = problem(folder / name, checks[name])
        if why is not None:
            found.append(f"{name}: {why}")
    return found


def _complete(folder: Path, marker: dict) -> bool:
    """Whether ``folder`` passes the checks its marker records (size, header and sampled pages of every file)."""
    return offload_marker(folder) == marker and not offload_problems(folder)


def _marker_matches(folder: Path, fingerprint: str) -> bool:
    marker = offload_marker(folder)
    return marker is not None and marker.get("fingerprint") == fingerprint and _complete(folder, marker)


def _remove_stale_temps(root: Path) -> None:
    """Delete temporary folders left by builders that no longer run (killed mid-build)."""
    for temp in root.glob(".tmp-offload-*"):
        try:
            pid = int(temp.name.split("-")[3])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(temp, ignore_errors=True)


def _discard(root: Path, path: Path) -> None:
    """Remove a foreign or broken entry at ``path`` (a folder, file or link).

    It is first renamed to a temporary name of this process, atomically: a concurrent builder
    that renamed its finished folder into place meanwhile is never half-deleted, and two
    processes discarding the same entry do not trip over each other.
    """
    trash = root / f".tmp-offload-trash-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process discarded it first
    if trash.is_dir() and not trash.is_symlink():
        shutil.rmtree(trash)
    else:
        trash.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare_offload_folder(
    root: str | os.PathLike[str], source: Checkpoint, entries: Sequence[OffloadEntry], shard_bytes: int = SHARD_BYTES
) -> OffloadFolder:
    """Reuse the complete folder for exactly these ``entries`` of ``source`` under ``root``, else the
    smallest one there that holds all of them (built for a plan with more on disk), or build it.

    Tensors are read from ``source`` one at a time, converted and streamed to disk, so the
    build never holds more than one tensor in memory. Safe against concurrent builders
    (the first rename wins; the others discard their copy) and against being killed.
    """
    root = Path(root)
    fingerprint = offload_fingerprint(source.identity(), entries)
    final = root / f"offload-{fingerprint[:24]}"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        _remove_stale_temps(root)
        if final.exists() or final.is_symlink():
            checked = _stamps(final)  # before the check: a change after it shows when the files are mapped
            if _marker_matches(final, fingerprint):
                log.info("reusing offload folder %s", final)
                return OffloadFolder(final, fingerprint, True, open_checkpoint(final / INDEX), checked)
            why = "; ".join(offload_problems(final)) or "its marker is for other tensors"
            log.warning("offload folder %s is damaged or foreign (%s); rebuilding it from the checkpoint", final, why)
            _discard(root, final)
        found = _superset(root, source.identity(), entries)
        if found is not None:
            log.info("reusing offload folder %s, which holds every tensor asked for and more", found[0])
            return OffloadFolder(found[0], found[1], True, open_checkpoint(found[0] / INDEX), _stamps(found[0]))
        callback = _BEFORE_BUILD.get()
        if callback is not None:
            callback(sum(_nbytes(e) for e in entries))
        temp = root / f".tmp-offload-{fingerprint[:12]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        temp.mkdir(mode=0o700)
    except OSError as err:
        raise OffloadError(
            f"cannot prepare offload folder under '{root}': {err.strerror or err}; "
            "pass a writable folder as offload_folder (placement.offload_folder)"
        ) from err
    try:
        _build(temp, source, entries, fingerprint, shard_bytes)
        try:
            os.rename(temp, final)
        except OSError:
            if not _marker_matches(final, fingerprint):
                raise
            shutil.rmtree(temp, ignore_errors=True)  # another process finished first; theirs is identical
            return OffloadFolder(final, fingerprint, True, open_checkpoint(final / INDEX), _stamps(final))
        _fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(err, (OSError, OffloadError)):  # the shard writer reports its OSErrors as OffloadError
            detail = (err.strerror or str(err)) if isinstance(err, OSError) else str(err)
            raise OffloadError(
                f"cannot write the offload folder under '{root}' ({detail}); nothing was kept; free space "
                "there or pass another folder as offload_folder (placement.offload_folder)"
            ) from err
        raise
    return OffloadFolder(final, fingerprint, False, open_checkpoint(final / INDEX), _stamps(final))


def _stamps(folder: Path) -> dict[str, tuple[int, int, int, int]]:
    """(device, inode, size, mtime in ns) of every file of ``folder`` now, by real path."""
    found = {}
    with contextlib.suppress(OSError):
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                info = path.stat()
                found[os.path.realpath(path)] = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    return found


def _build(folder: Path, source: Checkpoint, entries: Sequence[OffloadEntry], fingerprint: str, shard_bytes: int) -> None:
    # Aligned for zero-copy views: weight matrices on cache lines, every tensor to its itemsize.
    ordered = sorted(entries, key=lambda e: layout_key(e.name, e.dtype, e.shape))
    shards: list[list[OffloadEntry]] = [[]]
    size = 0
    for entry in ordered:
        nbytes = _nbytes(entry)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    weight_map: dict[str, str] = {}
    checks: dict[str, dict] = {}
    for number, shard in enumerate(shards, start=1):
        name = f"offload-{number:05d}-of-{len(shards):05d}.safetensors"
        path = folder / name
        specs = [spec for e in shard for spec in stored_tensors(e.name, e.dtype, tuple(e.shape), e.compression)]
        with SafetensorsWriter(path, specs) as writer:
            for entry in shard:
                tensor = source.load(entry.source_name, dtype=entry.dtype)
                if tensor.dtype != entry.dtype:  # integer tensors are never converted by the checkpoint
                    raise BigJobError(f"offloaded tensor '{entry.name}' is {tensor.dtype}, expected {entry.dtype}")
                for stored, value in stored_values(entry.name, tensor, entry.compression):
                    writer.write(stored, value)
                del tensor
        weight_map.update({stored: name for stored, _, _ in specs})
        checks[name] = file_checks(path)
    _write_json(folder / INDEX, {"metadata": {"format": "bigjob-offload"}, "weight_map": weight_map})
    checks[INDEX] = file_checks(folder / INDEX)
    files = {name: check["size"] for name, check in checks.items()}
    # The source and entries let a later plan that needs a subset of them use this folder as it is;
    # the checks let every reuse find a folder damaged since (see bigjob.engine.tiers.checksums).
    marker = {"format": OFFLOAD_FORMAT, "fingerprint": fingerprint, "files": files, "checks": checks,
              "source": source.identity(), "entries": _described(entries)}
    _write_json(folder / MARKER, marker)


def _nbytes(entry: OffloadEntry) -> int:
    return stored_nbytes(entry.dtype, tuple(entry.shape), entry.compression)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
