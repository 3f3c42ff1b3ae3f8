"""Paged units: disk-tier units of a model executing on the CPU, their file pages mapped in just in time.

A :class:`PagedUnit`'s parameters are zero-copy views of memory-mapped files. Before it runs,
its pages are mapped in bulk (by the prefetcher, one unit ahead); after, they are unmapped so
resident memory stays within the budget (the page cache keeps them for the next forward).
Where the page cache does not keep them, it reads the unit into a reused buffer instead
(:mod:`bigjob.engine.tiers.direct`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from bigjob.engine.run.hooks import TensorSlot, tensors_in
from bigjob.engine.run.prefetcher import Schedule
from bigjob.engine.tiers.direct import DirectReads
from bigjob.engine.tiers.pages import Range, populate, touch

__all__ = ["PagedUnit"]


@dataclass
class PagedUnit:
    """A disk-tier unit on the CPU: page its views in ahead of use and out after.

    With ``direct`` (and ``slots``, its file-backed tensors in the order of its layout), a
    forward may read the unit into a buffer instead and run on views of that buffer, when
    the page cache is found not to keep the file (:meth:`DirectReads.choose`).
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
        """Bring the unit's bytes in: a buffer holding them, or ``True`` once its file pages are mapped."""
        if self.direct is not None:
            if self.direct.choose(self.ranges):
                return self.direct.read()
            self.direct.pool.trim()  # mapping from now on: the free read buffers would only add to resident memory
        populate(self.ranges, self.schedule.readahead)
        touch(self.ranges)  # first touches (costly on some virtual machines) here, not in the layer's compute
        return True

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
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
