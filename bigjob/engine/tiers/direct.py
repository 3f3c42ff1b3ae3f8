"""Disk-tier units read straight from their files into reused buffers, past the page cache.

A disk-tier unit executed on the CPU normally runs on views of its memory-mapped file:
the page cache holds its bytes, and a forward only maps and unmaps them (see
:mod:`bigjob.engine.tiers.pages`). That is the fastest way while the page cache keeps the file.
When it does not (the disk tier is larger than the memory left to the cache, or something
else pushes it out), every forward reads the unit from disk into freshly allocated cache
pages that are thrown away again before the next one: allocation, reclaim and page-table
work for nothing. Measured on this project's 2-core VM, at batch 4 with 1 GiB on disk and
the cache evicted before each forward, that path cost 1.0-1.5x the warm forward, a read
with ``O_DIRECT`` into the same two reused buffers 1.0x.

:class:`DirectReads` holds what one unit needs for that: where each of its tensors lies in
its file (:class:`Layout`), the files opened with ``O_DIRECT`` (:class:`Files`; plain reads
where a file system refuses it) and a shared :class:`BufferPool`. Which units read directly
in a forward is the read policy's choice (:mod:`bigjob.engine.run.read_policy`). A unit is read
in requests of :data:`CHUNK` bytes, :data:`IN_FLIGHT` at a time: one large synchronous
request leaves a virtual disk idle between its parts (measured on this project's VM, 6 GiB
cold: one request per unit 2.3-3.4 GB/s, 4 x 16 MiB in flight 3.1 GB/s, steadier).

A buffer goes back to the pool after its unit's forward, to be refilled by a later unit. An
output that views the unit's weights (a module returning a slice of a table) keeps its buffer
out of the pool instead (:class:`~bigjob.engine.run.paged_units.PagedUnit` checks the output's storages).
A view kept anywhere else past the forward (module state, a global) is not seen: such a model
should use ``disk_reads="mapped"``.

>>> layout = Layout.of([("/m.safetensors", 4100, 8), ("/m.safetensors", 4108, 4)])
>>> [(e.offset, e.length, e.at) for e in layout.extents], layout.positions, layout.size
([(4096, 4096, 0)], (4, 12), 4096)
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from bigjob.engine.tiers.pages import PAGE, Range, resident
from bigjob.errors import CheckpointError

__all__ = ["ALIGN", "BufferPool", "CHUNK", "DirectReads", "Extent", "Files", "IN_FLIGHT", "Layout", "cached_fraction"]

log = logging.getLogger(__name__)

ALIGN = 4096  # O_DIRECT: file offset, length and buffer address in multiples of the logical block size
GAP = 1 << 20  # tensors of one file closer than this are read in one request, the gap included
_O_DIRECT = getattr(os, "O_DIRECT", 0)
CHUNK = 16 << 20  # bytes a read request (a multiple of ALIGN)
IN_FLIGHT = 4  # read requests of one unit in flight at once


def _down(value: int) -> int:
    return value - value % ALIGN


def _up(value: int) -> int:
    return value + -value % ALIGN


@dataclass(frozen=True)
class Extent:
    """One read: ``length`` bytes of ``path`` from ``offset`` into the buffer at ``at`` (all aligned)."""

    path: str
    offset: int
    length: int
    at: int
    end: int  # the last byte that must be read (exclusive, in the file): an extent may run past EOF


@dataclass(frozen=True)
class Layout:
    """Where a unit's tensors lie in their files, and in a buffer the unit is read into."""

    extents: tuple[Extent, ...]
    positions: tuple[int, ...]  # of each tensor in the buffer, in the order given to :meth:`of`
    size: int

    @classmethod
    def of(cls, places: Sequence[tuple[str, int, int]]) -> Layout:
        """The layout of tensors at ``(path, file offset, bytes)``.

        Each tensor keeps its offset modulo :data:`ALIGN` in the buffer, so a view of it has the
        alignment its dtype had in the file mapping.
        """
        order = sorted(range(len(places)), key=lambda i: (places[i][0], places[i][1]))
        extents: list[Extent] = []
        positions = [0] * len(places)
        runs: list[tuple[str, int, int, list[int]]] = []  # path, first byte, end, members
        for i in order:
            path, offset, nbytes = places[i]
            if runs and runs[-1][0] == path and offset <= runs[-1][2] + GAP:
                last = runs[-1]
                runs[-1] = (path, last[1], max(last[2], offset + nbytes), [*last[3], i])
            else:
                runs.append((path, offset, offset + nbytes, [i]))
        at = 0
        for path, first, end, members in runs:
            begin = _down(first)
            length = _up(end) - begin
            extents.append(Extent(path, begin, length, at, end))
            for i in members:
                positions[i] = at + places[i][1] - begin
            at += length
        return cls(tuple(extents), tuple(positions), at)


class Files:
    """Read-only descriptors of checkpoint files, opened once with ``O_DIRECT`` where the file system allows.

    A file system that refuses ``O_DIRECT`` (tmpfs, some network file systems) gets a plain
    descriptor: the reads then go through the page cache, still into the unit's buffer.
    """

    def __init__(self) -> None:
        self._fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self._readers: ThreadPoolExecutor | None = None
        self._closer = weakref.finalize(self, _close_all, self._fds)

    def add(self, path: str, inode: int) -> bool:
        """Open ``path`` now, if it is still the file with ``inode`` (the one mapped); whether it is."""
        try:
            fd, direct = self._open(path)
        except OSError as err:
            log.debug("cannot open %s for direct reads: %s", path, err)
            return False
        if os.fstat(fd).st_ino != inode:
            os.close(fd)  # replaced since it was mapped: reads would not see the mapped bytes
            return False
        with self._lock:
            old = self._fds.pop(path, None)
            if old is not None:
                os.close(old[0])
            self._fds[path] = (fd, direct)
        return True

    def open(self, path: str) -> tuple[int, bool]:
        """The descriptor of ``path`` and whether it bypasses the page cache."""
        with self._lock:
            found = self._fds.get(path)
            if found is not None:
                return found
            found = self._open(path)
            self._fds[path] = found
            return found

    @staticmethod
    def _open(path: str) -> tuple[int, bool]:
        if _O_DIRECT:
            try:
                return os.open(path, os.O_RDONLY | _O_DIRECT), True
            except OSError as err:
                if err.errno != errno.EINVAL:
                    raise
        return os.open(path, os.O_RDONLY), False

    def buffered(self, path: str) -> int:
        """Switch ``path`` to a plain descriptor (a direct read was refused); returns it.

        The new descriptor reopens the same file (``/proc/self/fd``), not whatever the path names now.
        """
        with self._lock:
            fd, direct = self._fds[path]
            if not direct:
                return fd
            plain = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
            os.close(fd)
            self._fds[path] = (plain, False)
            return plain

    def read(self, extent: Extent, into: memoryview) -> None:
        """Read ``extent`` into ``into`` (its ``length`` bytes); a file shorter than ``extent.end`` is an error."""
        needed = extent.end - extent.offset
        fd, direct = self.open(extent.path)
        done = 0
        while done < needed:
            try:
                n = os.preadv(fd, [into[done : extent.length]], extent.offset + done)
            except OSError as err:
                if direct and err.errno == errno.EINVAL:  # block size above ALIGN, or an odd device
                    log.debug("O_DIRECT read of %s refused (%s); reading it through the page cache", extent.path, err)
                    fd, direct = self.buffered(extent.path), False
                    continue
                raise CheckpointError(f"cannot read '{extent.path}' at byte {extent.offset + done}: {err.strerror or err}") from err
            if n == 0:
                raise CheckpointError(
                    f"'{extent.path}' ends at byte {extent.offset + done}, but its weights run to byte {extent.end}; "
                    "was the file truncated or replaced after loading?"
                )
            done += n

    def read_extents(self, extents: Sequence[Extent], into: memoryview) -> None:
        """Read every extent into its place in ``into``, in :data:`CHUNK` requests, :data:`IN_FLIGHT` at a time."""
        parts = []
        for extent in extents:
            for begin in range(0, extent.length, CHUNK):
                length = min(CHUNK, extent.length - begin)
                end = min(extent.end, extent.offset + begin + length)
                if end > extent.offset + begin:
                    parts.append((Extent(extent.path, extent.offset + begin, length, extent.at + begin, end), extent.at + begin))
        if len(parts) <= 1:
            for part, at in parts:
                self.read(part, into[at : at + part.length])
            return
        with self._lock:
            if self._readers is None:
                self._readers = ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="bigjob-read")
            readers = self._readers
        futures = [readers.submit(self.read, part, into[at : at + part.length]) for part, at in parts]
        errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def close(self) -> None:
        with self._lock:
            readers, self._readers = self._readers, None
            self._closer()
        if readers is not None:
            readers.shutdown(wait=True)


def _close_all(fds: dict[str, tuple[int, bool]]) -> None:
    for fd, _ in fds.values():
        try:
            os.close(fd)
        except OSError:
            pass
    fds.clear()


class BufferPool:
    """Page-aligned read buffers of one size, shared by a model's units, reused from forward to forward.

    :meth:`acquire` never waits: when every buffer is out (a prefetched unit that the
    forward skipped still holds one) it makes another. :meth:`trim` gives the free ones'
    memory back; a unit that maps its pages calls it, so buffers and mapped pages are not
    resident together beyond one unit's worth.
    """

    def __init__(self, size: int) -> None:
        self.size = _up(max(size, ALIGN))
        self._free: list[mmap.mmap] = []
        self._out = 0
        self._lock = threading.Lock()

    def acquire(self) -> mmap.mmap:
        with self._lock:
            self._out += 1
            if self._free:
                return self._free.pop()
        # Private: counted as the process's anonymous memory, and eligible for transparent huge pages
        # (shared anonymous memory is shmem, which most systems keep on small pages).
        buffer = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                buffer.madvise(mmap.MADV_HUGEPAGE)  # fewer TLB misses while the unit computes on it
            except OSError:
                pass
        return buffer

    def release(self, buffer: mmap.mmap) -> None:
        with self._lock:
            self._out -= 1
            self._free.append(buffer)

    def abandon(self, buffer: mmap.mmap) -> None:
        """Let ``buffer`` go without reusing it (something outside the unit still views it)."""
        with self._lock:
            self._out -= 1

    @property
    def held(self) -> int:
        """Buffers made and not trimmed (in use or free)."""
        with self._lock:
            return self._out + len(self._free)

    def trim(self) -> None:
        """Drop the free buffers (their memory returns when no view of them is left)."""
        with self._lock:
            self._free.clear()


def cached_fraction(ranges: Iterable[Range], windows: int = 8, window: int = 64 * PAGE) -> float | None:
    """The fraction of the pages of ``ranges`` (page-aligned) in the page cache; ``None`` where unknown.

    Each range is sampled at ``windows`` evenly spaced windows of ``window`` bytes (whole where
    it is shorter): ``mincore`` costs about 50 ns a page, ~13 ms a forward for a 1 GiB disk tier
    read whole, and the page cache gains and loses a file's pages in runs far longer than that.
    """
    total = hit = 0
    for r in ranges:
        if r.length <= windows * window:
            samples = [r]
        else:
            stride = (r.length - window) // (windows - 1)
            samples = [Range(r.start + i * stride - (i * stride) % PAGE, window) for i in range(windows)]
        for sample in samples:
            pages = resident(sample)
            if pages is None:
                return None
            total += sample.length // PAGE
            hit += pages
    return hit / total if total else None


class DirectReads:
    """One unit's direct reads: where its bytes lie, the shared open files, and the shared buffers."""

    def __init__(self, layout: Layout, files: Files, pool: BufferPool) -> None:
        self.layout = layout
        self.files = files
        self.pool = pool

    def read(self) -> mmap.mmap:
        """A buffer holding the unit's bytes (give it back with ``pool.release``)."""
        buffer = self.pool.acquire()
        try:
            view = memoryview(buffer)
            try:
                self.files.read_extents(self.layout.extents, view)
            finally:
                view.release()
        except BaseException:
            self.pool.release(buffer)
            raise
        return buffer

    def views(self, buffer: mmap.mmap, homes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Tensors shaped like ``homes`` over their bytes in ``buffer`` (the order of the layout)."""
        raw = torch.frombuffer(buffer, dtype=torch.uint8)
        out = []
        for home, at in zip(homes, self.layout.positions):
            nbytes = home.numel() * home.element_size()
            out.append(raw[at : at + nbytes].view(home.dtype).view(home.shape))
        return out
