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

__all__ = ["PAGE", "Range", "merge", "populate", "release"]

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_MADV_WILLNEED = 3
_MADV_DONTNEED = 4
_MADV_POPULATE_READ = 22  # Linux >= 5.14

_libc = None
_madvise = None
_populate_supported = True
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _madvise.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _madvise = None


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


def populate(ranges: Iterable[Range]) -> None:
    """Map the pages of ``ranges`` into the process now (reading them from disk if needed).

    The ranges are first announced to the kernel (``MADV_WILLNEED``: readahead of the whole
    range, many requests in flight, large page-cache folios) and then mapped in bulk. Page
    faults alone read a little at a time, one request after another, into small folios
    that later cost more to map and unmap; announced, a cold unit reads at the disk's
    sequential rate, and a warm one costs one cheap page-cache lookup more.
    """
    global _populate_supported
    ranges = list(ranges)
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


def release(ranges: Iterable[Range]) -> None:
    """Unmap the pages of ``ranges`` from the process; file-backed clean pages stay in the page cache.

    Only for read-only views of file mappings: private pages that were written would be lost.
    """
    failure = _advise(ranges, _MADV_DONTNEED)
    if failure not in (0, errno.ENOSYS):
        log.debug("release failed: %s", os.strerror(failure))
