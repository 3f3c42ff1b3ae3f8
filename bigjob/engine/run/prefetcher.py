"""Prefetching offloaded units ahead of use: one background thread, and the units in execution order.

A :class:`Prefetcher` (one background thread) prepares the next ``depth`` units while the
current one computes; the :class:`Schedule` holds the offloaded units in execution order, so
each unit, as it runs, can ask for the next ones to be prepared. It also carries what the
units of one dispatch share: the forward's token count, the read buffers of direct reads and
the device buffers streamed units are copied into.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from bigjob.engine.run.stream_buffers import DeviceSlots
from bigjob.engine.tiers.direct import BufferPool, Files
from bigjob.engine.tiers.pages import Range, release

__all__ = ["Prefetcher", "Schedule"]

log = logging.getLogger(__name__)


class Prefetcher:
    """One background thread preparing upcoming units; ``depth`` units ahead of the current one."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigjob-prefetch") if depth > 0 else None
        self._pending: dict[int, Future[Any]] = {}
        self._later: list[Future[Any]] = []
        self._lock = threading.Lock()

    def submit(self, key: int, task: Callable[[], Any], inline: bool = False) -> None:
        """Prepare ``key`` ahead with ``task``: on the prefetch thread, or at once on this one when ``inline``.

        ``inline`` is for tasks that only queue work on a device (a pinned unit's copy): the
        caller's thread queues it in microseconds, where a hand-off to the prefetch thread
        could wait a whole GIL switch interval (5 ms) behind a forward running Python.
        """
        if self._pool is None:
            return
        with self._lock:
            if key in self._pending:
                return
            if not inline:
                self._pending[key] = self._pool.submit(task)
                return
        future: Future[Any] = Future()
        try:
            future.set_result(task())
        except BaseException as err:  # noqa: BLE001 - raised again by take(), as from the thread
            future.set_exception(err)
        with self._lock:
            self._pending[key] = future

    def take(self, key: int) -> Any:
        """The result of the prefetch for ``key`` (waiting for it), or ``None`` if there was none."""
        with self._lock:
            future = self._pending.pop(key, None)
        return None if future is None else future.result()

    def later(self, task: Callable[[], Any]) -> None:
        """Run ``task`` on the prefetch thread after what is already queued (now, without one)."""
        if self._pool is None:
            task()
            return
        with self._lock:
            self._later.append(self._pool.submit(task))

    def settle(self) -> None:
        """Wait for the tasks given to :meth:`later`."""
        with self._lock:
            later, self._later = self._later, []
        for future in later:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a failed page release only leaves pages mapped
                log.debug("deferred task failed", exc_info=True)

    def drain(self) -> None:
        self.settle()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a failed prefetch is redone synchronously when needed
                log.debug("prefetch failed", exc_info=True)

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None


class Schedule:
    """The offloaded units in execution order, so each can ask for the next ones to be prefetched."""

    def __init__(self, prefetcher: Prefetcher) -> None:
        self.prefetcher = prefetcher
        self.units: list[Any] = []
        self.tokens: int | None = None  # of the current root forward; set before its first prefetch
        self.pinned: int | None = None  # set by dispatch_info.execution_tokens: the count every forward uses
        self.readahead = True  # announce a unit's pages before mapping them; off once they asked for huge folios
        self.pool: BufferPool | None = None  # read buffers of units that read directly (bigjob.engine.tiers.direct)
        self.files: Files | None = None  # their open checkpoint files: closed when the hooks are removed
        self.unit_reads = {"mapped": 0, "direct": 0}  # disk-tier units run on the CPU so far, by how their bytes came
        self.slots: dict[torch.device, DeviceSlots] = {}  # per GPU: the buffers streamed units are copied into
        self.solo: set[int] = set()  # units the plan brings back one at a time (bigjob.engine.plan.budget_fallback)
        self.reads: Any = None  # the disk tier's per-forward reads (bigjob.engine.run.paged_units.PagedReads)

    def add(self, unit: Any) -> int:
        self.units.append(unit)
        return len(self.units) - 1

    def release_later(self, ranges: list[Range]) -> None:
        """Unmap a unit's file pages on the prefetch thread, after the next unit's pages are in.

        Unmapping costs page-table work (~8 ms a GiB); done there it overlaps this thread's
        compute. :class:`RootHook` waits for it at the end of the forward, so resident memory
        is back within the budget when the forward returns.
        """
        if ranges:
            self.prefetcher.later(lambda: release(ranges))

    def ahead(self, position: int) -> None:
        """Prefetch the units after ``position``, up to one in ``solo``; nothing while a ``solo`` unit runs."""
        if self.solo and (position in self.solo or position - 1 in self.solo):
            self.prefetcher.settle()  # the unit before has released its pages: one unit in flight
        stop = 0 if position in self.solo else min(position + 1 + self.prefetcher.depth, len(self.units))
        reads = self.reads if self.reads is not None and self.reads.active else None
        for nxt in range(position + 1, stop):
            if nxt in self.solo:
                break
            if reads is not None and nxt in reads.by_position:
                continue  # read ahead by the disk reader, or mapped just in time
            unit = self.units[nxt]
            self.prefetcher.submit(nxt, unit.prepare, inline=getattr(unit, "queues_only", False))

