"""Residency of memory-mapped weights: fault pages in ahead of use, give them back after.

Disk-tier weights executed on the CPU are zero-copy views into memory-mapped safetensors
files. Touching them maps page-cache pages into the process (they count in RSS, not in
anonymous memory). :func:`populate` maps a range in bulk (``MADV_POPULATE_READ``, one
system call instead of a fault per 4 KiB page; it reads from disk if the pages are not
cached), and :func:`release` unmaps a range again (``MADV_DONTNEED``: for clean file pages
this drops them from the process only; the page cache keeps them for the next forward).

The calls go through ``ctypes``, which releases the GIL, so a prefetch thread can populate
the next module while the main thread computes.

>>> import mmap, ctypes
>>> buf = mmap.mmap(-1, 3 * PAGE)
>>> start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
>>> Range(start + 10, 100).aligned() == Range(start, PAGE)
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import sys
from collections.abc import Iterable
from typing import NamedTuple

import torch

__all__ = ["PAGE", "Range", "huge_pages_enabled", "merge", "populate", "prefer_huge", "release", "resident", "touch"]

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_MADV_HUGEPAGE = 14
_MADV_POPULATE_READ = 22  # Linux >= 5.14
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"

_libc = None
_madvise = None
_mincore = None
_populate_supported = True
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
        _mincore = _libc.mincore
        _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _mincore.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None
        _mincore = None


class Range(NamedTuple):
    """A byte range of the address space: start address and length."""

    start: int
    length: int

    def aligned(self) -> Range:
        """The smallest page-aligned range covering this one."""
        begin = self.start - self.start % PAGE
        end = self.start + self.length
        end += -end % PAGE
        return Range(begin, end - begin)


def merge(ranges: Iterable[Range]) -> list[Range]:
    """The whole pages inside ``ranges``, with touching or overlapping neighbours joined first.

    Joining before rounding keeps the pages shared by two neighbouring tensors of one unit;
    rounding *inward* then keeps a page shared with anything else (a resident tensor next
    to an offloaded one in the same file) out of the range, so releasing a unit never
    unmaps a page that another tensor lives on. At most one partial page at each end of a
    joined range stays mapped.

    >>> merge([Range(0, 10), Range(10, PAGE), Range(10 * PAGE + 5, 3 * PAGE)]) == [Range(0, PAGE), Range(11 * PAGE, 2 * PAGE)]
    True
    """
    joined: list[Range] = []
    for r in sorted(r for r in ranges if r.length > 0):
        if joined and r.start <= joined[-1].start + joined[-1].length:
            last = joined[-1]
            joined[-1] = Range(last.start, max(last.start + last.length, r.start + r.length) - last.start)
        else:
            joined.append(r)
    out: list[Range] = []
    for r in joined:
        begin = r.start + (-r.start % PAGE)
        end = r.start + r.length
        end -= end % PAGE
        if end > begin:
            out.append(Range(begin, end - begin))
    return out


def _advise(ranges: Iterable[Range], advice: int) -> int:
    """Apply ``advice`` to each range; returns the errno of the first failure, else 0."""
    if _madvise is None:
        return errno.ENOSYS
    for r in ranges:
        if _madvise(r.start, r.length, advice) != 0:
            return ctypes.get_errno()
    return 0


def huge_pages_enabled() -> bool:
    """Whether transparent huge pages may back a mapping that asks for them (``always`` or ``madvise``)."""
    try:
        with open(_THP_SETTING) as setting:
            text = setting.read()
    except OSError:
        return False
    return "[always]" in text or "[madvise]" in text


def prefer_huge(ranges: Iterable[Range]) -> bool:
    """Ask that pages read into the cache through ``ranges`` come as 2 MiB folios (``MADV_HUGEPAGE``).

    A 2 MiB folio maps with one page-table entry instead of 512: a weight streamed through
    a file mapping every forward costs a few milliseconds a GiB to map and unmap instead of
    tens (882 MiB: 10 ms against 112 ms measured). The kernel picks a folio's size when it
    reads the page, and a fault through a mapping carrying this advice reads whole 2 MiB
    folios. Returns whether the advice took (transparent huge pages on, every call accepted).
    """
    ranges = [r.aligned() for r in ranges if r.length > 0]
    if not ranges or not huge_pages_enabled():
        return False
    return _advise(ranges, _MADV_HUGEPAGE) == 0


def populate(ranges: Iterable[Range], readahead: bool = True) -> None:
    """Map the pages of ``ranges`` into the process now (reading them from disk if needed).

    With ``readahead`` the ranges are first announced to the kernel (``MADV_WILLNEED``:
    readahead of the whole range at once, many requests in flight) and then mapped in bulk.
    Announced pages come into the cache in folios of the kernel's readahead size, which
    ignores :func:`prefer_huge`; ranges that asked for huge folios populate without it (the
    faults then read 2 MiB folios, 4 MiB a request: as fast on a local disk, measured).
    """
    global _populate_supported
    ranges = list(ranges)
    if readahead or not _populate_supported:
        _advise(ranges, _MADV_WILLNEED)
    if _populate_supported:
        failure = _advise(ranges, _MADV_POPULATE_READ)
        if failure in (0, errno.EINTR):
            return
        if failure == errno.EINVAL:  # kernel older than 5.14: fall back to readahead hints
            _populate_supported = False
            log.debug("MADV_POPULATE_READ unsupported; pages fault in on use after the readahead")
        else:
            log.debug("populate failed: %s", os.strerror(failure))


_TOUCH_CHUNK = 16384  # pages a call: under PyTorch's parallel grain, so each call stays on the calling thread


def touch(ranges: Iterable[Range]) -> None:
    """Read one byte of every page of ``ranges``, so the first access to each happens here.

    Mapping a page is not the last cost of its first use. On a virtual machine whose host
    takes back the memory of pages the guest freed (free page reporting, ballooning), a page
    cache page filled since is backed again only when a CPU first touches it: that measured
    1.5 ms a MiB on the development machine, against 3 ms a GiB once touched. Called from
    the prefetch thread after :func:`populate`, those stalls happen there, beside the
    compute, instead of inside the next layer's matrix product. The loads run in PyTorch,
    without the GIL. Pages not mapped yet fault in (and read from disk if needed).

    >>> buf = mmap.mmap(-1, 3 * PAGE)
    >>> start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    >>> touch([Range(start, 3 * PAGE)]); resident(Range(start, 3 * PAGE))
    3
    """
    step = _TOUCH_CHUNK * PAGE
    for r in ranges:
        r = r.aligned()
        for begin in range(r.start, r.start + r.length, step):
            length = min(step, r.start + r.length - begin)
            pages = torch.frombuffer((ctypes.c_ubyte * length).from_address(begin), dtype=torch.uint8)
            pages.as_strided((length // PAGE,), (PAGE,)).max()


def resident(r: Range) -> int | None:
    """Pages of the page-aligned range ``r`` of a mapping that are in the page cache, mapped or not.

    ``None`` where the system cannot say (no ``mincore``, or a range outside any mapping).
    """
    if _mincore is None or r.length <= 0:
        return None
    vector = (ctypes.c_ubyte * (r.length // PAGE))()
    if _mincore(r.start, r.length, vector) != 0:
        return None
    return bytes(vector).translate(_LOW_BIT).count(1)  # bit 0 says resident; the others are reserved


_LOW_BIT = bytes(b & 1 for b in range(256))


def release(ranges: Iterable[Range]) -> None:
    """Unmap the pages of ``ranges`` from the process; file-backed clean pages stay in the page cache.

    Only for read-only views of file mappings: private pages that were written would be lost.
    """
    failure = _advise(ranges, _MADV_DONTNEED)
    if failure not in (0, errno.ENOSYS):
        log.debug("release failed: %s", os.strerror(failure))


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    Tensors of a few MiB come from glibc's heap, which keeps what is freed for reuse: after
    CPU-tier weights were converted and then copied into pinned memory, their first copies
    would stay counted in the process's resident memory, against the CPU budget.
    """
    trim = getattr(_libc, "malloc_trim", None)  # glibc only (not musl, not macOS)
    if trim is not None:
        trim(0)
