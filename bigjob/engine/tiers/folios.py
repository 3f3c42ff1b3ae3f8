"""Page-cache folio size of the files that disk-tier weights stream from.

A disk-tier unit executed on the CPU is mapped before its forward and unmapped after (see
:mod:`bigjob.engine.tiers.pages`). What that costs depends on how the kernel holds the file's
pages: a 2 MiB folio maps with one page-table entry, the same bytes in 4 KiB folios with
512. Measured on a 2-core VM for 882 MiB, mapping plus unmapping took 10 ms with 2 MiB
folios and 112 ms with 4 KiB ones: a third of a batch-1 forward of a 341M model.

The folio size is fixed when a page is read into the cache, by whoever reads it first.
bigjob's own mappings ask for huge folios (``MADV_HUGEPAGE``), so pages it reads come in
large. A file that was just written (a fresh download, the offload folder's converted
weights) or that another program read with small random reads sits in small folios until
evicted, and every forward pays for it.

:func:`refresh_small_folios` runs once, after the first forward: it maps a few MiB of each
streamed file, asks the kernel how much of that came in as PMD mappings, and for a file held
in small folios drops the file's cached pages (``POSIX_FADV_DONTNEED``, which leaves pages
anyone still maps alone: the resident tier stays), so the next forward reads them once more
through a mapping that asks for huge folios. One extra read of the disk tier, once, in
exchange for cheap mapping on every forward after.

Linux only; elsewhere, or where transparent huge pages are off, it does nothing.

>>> refresh_small_folios([]) == []
True
"""

from __future__ import annotations

import bisect
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from bigjob.engine.tiers.pages import (
    PAGE,
    Range,
    huge_pages_enabled,
    populate,
    release,
    resident,
)

__all__ = ["FileMapping", "drop_cached", "file_mappings", "pmd_mapped_kib", "refresh_small_folios"]

log = logging.getLogger(__name__)

HUGE = 2 << 20  # one PMD mapping on x86-64 and arm64 with 4 KiB pages
PROBE = 2 * HUGE


@dataclass(frozen=True)
class FileMapping:
    """One mapping of a file in this process, as ``/proc/self/maps`` lists it."""

    start: int
    end: int
    offset: int  # of ``start`` in the file
    path: str
    inode: int = 0

    def file_offset(self, address: int) -> int:
        return self.offset + (address - self.start)


def file_mappings(addresses: Iterable[int]) -> dict[int, FileMapping]:
    """The file mapping holding each address (addresses in no file mapping are left out).

    >>> file_mappings([0])
    {}
    """
    wanted = sorted(set(addresses))
    found: dict[int, FileMapping] = {}
    if not wanted:
        return found
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or not parts[5].startswith("/"):
                    continue
                start, end = (int(x, 16) for x in parts[0].split("-"))
                inside = wanted[bisect.bisect_left(wanted, start):bisect.bisect_left(wanted, end)]
                if inside:
                    mapping = FileMapping(start, end, int(parts[2], 16), parts[5].rstrip("\n"), int(parts[4]))
                    found.update(dict.fromkeys(inside, mapping))
    except OSError:
        return {}
    return found


def pmd_mapped_kib(starts: Iterable[int]) -> dict[int, int]:
    """KiB mapped by PMD entries (``FilePmdMapped`` + ``ShmemPmdMapped``) in each mapping starting at one of ``starts``."""
    wanted = set(starts)
    out: dict[int, int] = {}
    current: int | None = None
    try:
        with open("/proc/self/smaps") as smaps:
            for line in smaps:
                head = line.split(maxsplit=1)[0]
                if not head.endswith(":") and "-" in head:
                    start = int(head.split("-")[0], 16)
                    current = start if start in wanted else None
                elif current is not None and head in ("FilePmdMapped:", "ShmemPmdMapped:"):
                    out[current] = out.get(current, 0) + int(line.split()[1])
    except OSError:
        return {}
    return out


def drop_cached(ranges: Iterable[Range]) -> int:
    """Drop the page-cache pages behind ``ranges`` of file mappings; returns the bytes advised.

    The ranges must not be mapped by this process (release them first): the kernel keeps any
    page that someone maps, and dirty pages until they are written back.
    """
    ranges = [r for r in ranges if r.length > 0]
    mappings = file_mappings(r.start for r in ranges)
    by_path: dict[str, list[tuple[int, int]]] = {}
    for r in ranges:
        mapping = mappings.get(r.start)
        if mapping is not None:
            by_path.setdefault(mapping.path, []).append((mapping.file_offset(r.start), r.length))
    return sum(_drop(path, spans) for path, spans in by_path.items())


def _drop(path: str, spans: list[tuple[int, int]]) -> int:
    """``POSIX_FADV_DONTNEED`` over ``(offset, length)`` spans of ``path`` (length 0: to the end)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        log.debug("cannot open %s to drop its cached pages: %s", path, err)
        return 0
    advised = 0
    try:
        for offset, length in spans:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
            advised += length or os.fstat(fd).st_size - offset
    except OSError as err:
        log.debug("posix_fadvise(DONTNEED) failed on %s: %s", path, err)
    finally:
        os.close(fd)
    return advised


def _probe_window(ranges: list[Range], mapping: FileMapping) -> Range | None:
    """A PROBE-long, 2 MiB-aligned window in the middle of the longest of ``ranges``, or None.

    The middle, not an edge: where a range meets pages cached by someone else, the kernel's
    readahead may start small and grow, which says nothing about the rest of the file.
    """
    if (mapping.start - mapping.offset) % HUGE:
        return None  # address and file offset disagree modulo 2 MiB: no PMD mapping is possible
    longest = max(ranges, key=lambda r: r.length)
    middle = longest.start + longest.length // 2
    begin = max(middle - PROBE // 2 - (middle - PROBE // 2) % HUGE, longest.start + (-longest.start % HUGE))
    if begin + PROBE > longest.start + longest.length:
        return None
    return Range(begin, PROBE)


def refresh_small_folios(ranges: Iterable[Range]) -> list[str]:
    """Drop streamed files held in small page-cache folios, so the next reads bring huge ones.

    ``ranges`` are the pages of the views a forward maps and unmaps (file views of streamed
    weights only: they are unmapped here first). For each file they lie in, a probe window
    is mapped, measured and unmapped; a file whose probe came in without PMD mappings has
    its unmapped pages dropped from the page cache. Returns the paths dropped. Costs two reads of ``/proc/self/smaps`` and a few MiB
    of mapping per file; nothing at all where transparent huge pages are off.
    """
    ranges = [r for r in ranges if r.length >= PAGE]
    if not ranges or not huge_pages_enabled():
        return []
    release(ranges)  # pages two units share stay mapped between forwards; mapped, they could not be dropped
    mappings = file_mappings(r.start for r in ranges)
    grouped: dict[FileMapping, list[Range]] = {}
    for r in ranges:
        mapping = mappings.get(r.start)
        if mapping is not None:
            grouped.setdefault(mapping, []).append(r)
    probes = {m: w for m, rs in grouped.items() if (w := _probe_window(rs, m)) is not None}
    if not probes:
        return []
    before = pmd_mapped_kib(m.start for m in probes)
    populate(probes.values(), readahead=False)  # a cold probe reads huge folios, as the units will
    after = pmd_mapped_kib(m.start for m in probes)
    release(probes.values())
    if not after:
        return []  # no smaps here: nothing can be said
    dropped = []
    for mapping, window in probes.items():
        huge_kib = after.get(mapping.start, 0) - before.get(mapping.start, 0)
        if huge_kib * 1024 >= window.length // 2:
            continue
        # The whole file: pages this process still maps (its resident tier) stay; the header's
        # and the neighbours' small folios go too, or the first 2 MiB read would collide with them.
        _drop(mapping.path, [(0, 0)])
        if resident(window) == 0:  # tmpfs, or pages another process maps, stay: then say nothing
            dropped.append(mapping.path)
    if dropped:
        streamed = sum(r.length for m, rs in grouped.items() if m.path in dropped for r in rs)
        log.debug(  # an internal optimisation the user cannot act on: not for INFO
            "%d streamed file(s) were cached in small page-cache folios (e.g. %s); dropped them once so the "
            "next forward reads their %.0f MiB back into 2 MiB folios, which cost ~10x less to map every forward",
            len(dropped), dropped[0], streamed / 2**20,
        )
    return dropped
