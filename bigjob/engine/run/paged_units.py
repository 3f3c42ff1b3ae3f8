"""Paged units: disk-tier units of a model executing on the CPU, their file pages mapped in just in time.

A :class:`PagedUnit`'s parameters are zero-copy views of memory-mapped files. Before it runs,
its pages are mapped in bulk (by the prefetcher, one unit ahead); after, they are unmapped so
resident memory stays within the budget (the page cache keeps them for the next forward).

Where the disk tier does not fit the page cache, :class:`PagedReads` decides at the start of
each forward which units stay cached and which read past the cache into reused buffers
(:mod:`bigjob.engine.run.read_policy`), and reads the latter ahead in execution order
(:mod:`bigjob.engine.run.disk_reader`). The cached ones are mapped by the prefetch thread
while the directly read unit before them computes, or just in time after another cached
unit, so that the buffers read ahead and the pages mapped stay within the prefetch reserve.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bigjob.engine.run.disk_reader import DiskReader
from bigjob.engine.run.hooks import TensorSlot, tensors_in
from bigjob.engine.run.prefetcher import Schedule
from bigjob.engine.run.read_policy import ReadPolicy
from bigjob.engine.tiers.direct import BufferPool, DirectReads, cached_fraction
from bigjob.engine.tiers.pages import Range, populate, touch

__all__ = ["PagedReads", "PagedUnit"]

log = logging.getLogger(__name__)


@dataclass
class PagedUnit:
    """A disk-tier unit on the CPU: page its views in ahead of use and out after.

    With ``direct`` (and ``slots``, its file-backed tensors in the order of its layout), a
    forward may run it on views of a buffer its bytes were read into instead
    (when :class:`PagedReads` says so).
    """

    name: str
    ranges: list[Range]
    schedule: Schedule
    keep: list[Range] = field(default_factory=list)  # tied tensors: released at the end of the forward
    position: int = -1
    direct: DirectReads | None = None
    slots: list[TensorSlot] = field(default_factory=list)
    _buffer: Any = field(default=None, repr=False)
    _base: int = field(default=0, repr=False)  # address of the buffer's tensor storage while installed

    def prepare(self) -> Any:
        """Map the unit's file pages (``True`` once they are in)."""
        populate(self.ranges, self.schedule.readahead)
        touch(self.ranges)  # first touches (costly on some virtual machines) here, not in the layer's compute
        return True

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        reads: PagedReads | None = self.schedule.reads
        if reads is not None and reads.active:
            ready = reads.bring(self)
        else:
            ready = self.schedule.prefetcher.take(self.position)
            self.schedule.ahead(self.position)
            if ready is None:
                ready = self.prepare()
        if ready is not True:
            assert self.direct is not None
            self._buffer = ready
            views = self.direct.views(ready, [slot.home for slot in self.slots])
            self._base = views[0].untyped_storage().data_ptr() if views else 0
            for slot, view in zip(self.slots, views):
                slot.install(view)
            self.schedule.unit_reads["direct"] += 1
        else:
            self.schedule.unit_reads["mapped"] += 1
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self._buffer is not None:
            assert self.direct is not None
            for slot in self.slots:
                slot.restore()
            buffer, self._buffer = self._buffer, None
            if any(t.device.type == "cpu" and t.untyped_storage().data_ptr() == self._base for t in tensors_in(output)):
                # The output is (a view of) a weight: the buffer must live on with it, unchanged, so it
                # leaves the pool (the output's storage keeps it alive) and a new one takes its place.
                self.direct.pool.abandon(buffer)
            else:
                self.direct.pool.release(buffer)
        else:
            self.schedule.release_later(self.ranges)
        return output


class PagedReads:
    """A model's disk-tier reads, forward by forward: the policy's choice, and the read-ahead of the direct units.

    ``reserve`` is the memory the plan keeps for offloaded units in flight
    (``(1 + prefetch)`` of the largest). A forward that reads some units directly uses it for
    read buffers, reused from forward to forward, and, where it keeps units cached too, for
    the one mapped just in time: ``reserve // unit`` buffers, one less with kept units. One
    buffer is the unit computing; the read-ahead fills the others.
    """

    def __init__(self, units: list[PagedUnit], policy: ReadPolicy, pool: BufferPool, reserve: int) -> None:
        self.units = units  # those that can read directly, in execution order
        self.by_position = {unit.position: unit for unit in units}
        self.policy = policy
        self.pool = pool
        self.reserve = reserve
        self.reader = DiskReader(0)
        self.active = False  # this forward reads some units directly
        self.direct: frozenset[int] = frozenset()

    def begin(self) -> None:
        """At a forward's start: choose, and start reading ahead."""
        # disk_reads="direct" reads every unit whatever the cache holds: no mincore sampling for it.
        cached = [] if self.policy.mode == "direct" else [cached_fraction(unit.ranges) for unit in self.units]
        unmade = max(self.reserve - self.pool.held * self.pool.size, 0)  # buffers the room reading cannot see yet
        self.direct = self.policy.decide(cached, reserve=unmade) if None not in cached else frozenset()
        self.active = bool(self.direct)
        if not self.active:
            self.pool.trim()  # mapping only: free read buffers would only add to resident memory
            return
        buffers = max(self.reserve // self.pool.size - (len(self.direct) < len(self.units)), 1)
        self.reader.budget = (buffers - 1) * self.pool.size
        if self.pool.held > buffers:
            self.pool.trim()
        if self.reader.budget > 0:
            self.reader.start([(p, self.pool.size, self.by_position[p].direct.read) for p in sorted(self.direct)])  # type: ignore[union-attr]

    def bring(self, unit: PagedUnit) -> Any:
        """The unit's bytes for this forward: its read buffer, or ``True`` once its pages are mapped."""
        prefetcher = unit.schedule.prefetcher
        if unit.position in self.direct:
            assert unit.direct is not None
            buffer = self.reader.take(unit.position) if self.reader.budget > 0 else None
            if buffer is None:
                buffer = unit.direct.read()
            # A kept unit next is mapped while this one computes: this buffer, the one filling
            # and its pages are within the reserve (after a kept unit, its pages and a free buffer are).
            after = self.by_position.get(unit.position + 1)
            if after is not None and after.position not in self.direct:
                prefetcher.submit(after.position, after.prepare)
            return buffer
        ready = prefetcher.take(unit.position)
        if ready is not None:
            return ready
        # Kept in the cache: mapped now, once the pages of the unit before are unmapped.
        prefetcher.settle()
        return unit.prepare()

    def end(self) -> None:
        """At a forward's end (or its failure): stop reading ahead, give back what it read for nothing."""
        if self.active:
            self.reader.stop(self.pool.release)
            self.active = False

    def close(self) -> None:
        """Stop the reader's thread and let go of the units (they refer back to the schedule)."""
        self.reader.close()
        self.units = []
        self.by_position = {}
