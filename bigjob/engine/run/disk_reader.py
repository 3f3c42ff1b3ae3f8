"""The read-ahead of a forward's directly read units: one thread, in execution order, within a byte budget.

When a forward reads some disk-tier units past the page cache (:mod:`bigjob.engine.run.read_policy`),
their reads are the forward's critical path: the disk must never wait for the compute. A
:class:`DiskReader` is given the forward's direct units in execution order at its start and
reads them one after the other, each into a buffer of the shared pool, as far ahead as its
``budget`` of bytes allows (buffers read and not yet taken count; a taken buffer moves to the
compute side). The units kept in the cache are mapped just in time by the compute thread, so
they never hold back a read; the disk stays busy across them.

Each read is itself split into requests of :data:`~bigjob.engine.tiers.direct.CHUNK` bytes, several
in flight (:meth:`~bigjob.engine.tiers.direct.Files.read_extents`).

>>> import threading
>>> reader = DiskReader(budget=8)
>>> reader.start([(3, 4, lambda: "three"), (5, 4, lambda: "five")])
>>> reader.take(3), reader.take(5), reader.take(9)
('three', 'five', None)
>>> reader.stop(lambda buffer: None)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DiskReader"]

log = logging.getLogger(__name__)

Job = tuple[int, int, Callable[[], Any]]  # position, bytes, read (returns the buffer)


class DiskReader:
    """Reads ``(position, bytes, read)`` jobs ahead on one thread, holding at most ``budget`` bytes of unread-by-compute buffers.

    A job larger than the whole budget still runs, alone. :meth:`take` hands over a job's
    buffer (waiting for it), or ``None`` for a position it was not given or has passed;
    positions before the one taken are given up (a forward that skipped a unit).
    """

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._ready: dict[int, tuple[int, Any, BaseException | None]] = {}
        self._reading: int | None = None
        self._held = 0
        self._generation = 0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._orphans: list[Any] = []  # buffers read for a forward that no longer wants them
        self.read_seconds = 0.0  # summed over this reader's jobs (for the read rate the depth follows)
        self.read_bytes = 0

    def start(self, jobs: Sequence[Job]) -> None:
        """Queue a forward's jobs (after :meth:`stop` of the previous one)."""
        with self._cond:
            self._queue.extend(jobs)
            self._generation += 1
            if self._thread is None and jobs:
                self._thread = threading.Thread(target=self._run, name="bigjob-disk-reader", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (
                    not self._queue or (self._held and self._held + self._queue[0][1] > self.budget)
                ):
                    self._cond.wait()
                if self._closed:
                    return
                position, nbytes, read = self._queue.popleft()
                self._reading = position
                self._held += nbytes
                generation = self._generation
            began = time.perf_counter()
            buffer, error = None, None
            try:
                buffer = read()
            except BaseException as err:  # noqa: BLE001 - handed to the compute thread by take()
                error = err
            with self._cond:
                self.read_seconds += time.perf_counter() - began
                self.read_bytes += nbytes if error is None else 0
                self._reading = None
                if generation == self._generation or error is not None:
                    self._ready[position] = (nbytes, buffer, error)
                else:
                    self._held -= nbytes  # stopped meanwhile: nobody will take it
                    self._orphans.append(buffer)
                self._cond.notify_all()

    def take(self, position: int) -> Any:
        """The buffer read for ``position`` (raising what its read raised), or ``None`` if it was not queued."""
        with self._cond:
            while True:
                for early in [p for p in self._ready if p < position]:
                    self._give_up(early)
                while self._queue and self._queue[0][0] < position:
                    self._queue.popleft()
                if position in self._ready:
                    nbytes, buffer, error = self._ready.pop(position)
                    self._held -= nbytes
                    self._cond.notify_all()
                    if error is not None:
                        raise error
                    return buffer
                if self._reading != position and not (self._queue and self._queue[0][0] == position):
                    return None
                self._cond.wait()

    def _give_up(self, position: int) -> None:
        nbytes, buffer, _ = self._ready.pop(position)
        self._held -= nbytes
        if buffer is not None:
            self._orphans.append(buffer)

    def stop(self, release: Callable[[Any], None]) -> None:
        """End the forward: drop queued jobs, wait for the one in flight, ``release`` every buffer not taken."""
        with self._cond:
            self._queue.clear()
            self._generation += 1
            while self._reading is not None:
                self._cond.wait()
            for position in list(self._ready):
                self._give_up(position)
            orphans, self._orphans = self._orphans, []
            self._cond.notify_all()
        for buffer in orphans:
            if buffer is not None:
                release(buffer)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
