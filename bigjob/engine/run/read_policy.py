"""Which disk-tier units stay in the page cache and which are read past it, decided per forward.

A disk tier that fits the page cache is best mapped: after the first forward every unit
is a cache hit. One that does not fit must not be read through the cache at all: an LRU
scanned in order each forward evicts each page before it is needed again, and every byte
comes from disk *and* costs cache churn. So at the start of each forward the policy compares
the tier with the room the cache really has (:func:`~bigjob.engine.tiers.cache_room.page_cache_room`,
less the read buffers still to be made and a margin) and keeps a set of units whose bytes fit
it: those are mapped (and stay cached, since nothing else of the tier goes through the
cache), the others are read with ``O_DIRECT`` into reused buffers. What must come from disk
each forward is then the tier less the room: the disk bound.

The kept set is stable from forward to forward (a unit kept stays kept while the room allows,
so its pages are not read again), prefers units the cache already holds, and is spread evenly
over the forward, so the reads of the units in between overlap the compute of the kept ones.
If the cache drops kept pages at two forwards running (once may be someone emptying it; twice,
other work needs the memory, or the room was overestimated), the room is capped at what it did
keep of them, which grows back a unit a forward while nothing is lost.

>>> sorted(choose_kept([10] * 6, room=30))  # every other unit, starting with the first
[0, 2, 4]
>>> sorted(choose_kept([10] * 6, room=60))
[0, 1, 2, 3, 4, 5]
>>> sorted(choose_kept([10] * 6, room=30, previous={1, 2, 3, 4}))  # stable: the last kept ones go
[1, 2, 3]
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from bigjob.engine.tiers.cache_room import ENV, page_cache_room

__all__ = ["ReadPolicy", "choose_kept"]

log = logging.getLogger(__name__)

HIT = 0.9  # a unit at least this much cached counts as held by the cache
LOST = 0.5  # a kept unit found less cached than this at a forward's start was dropped by the cache


def choose_kept(
    sizes: Sequence[int], room: int, cached: Sequence[float] = (), previous: Collection[int] | None = None
) -> frozenset[int]:
    """Units (indexes into ``sizes``) to keep cached within ``room`` bytes.

    ``previous`` (last forward's set) is kept as far as it fits, dropping its last units
    first; otherwise units ``cached`` (fractions, as :func:`~bigjob.engine.tiers.direct.cached_fraction`)
    at least :data:`HIT` come first. The room left is spread evenly over the remaining units.
    """
    n = len(sizes)
    if sum(sizes) <= room:
        return frozenset(range(n))
    if previous is not None:
        kept = [i for i in sorted(previous) if i < n]
    else:
        kept = [i for i in range(n) if i < len(cached) and cached[i] >= HIT]
    used = sum(sizes[i] for i in kept)
    while kept and used > room:
        used -= sizes[kept.pop()]
    chosen = set(kept)
    rest = [i for i in range(n) if i not in chosen]
    free = room - used
    if previous is not None and rest and free < min(sizes[i] for i in rest):
        return frozenset(chosen)  # nothing more fits: the set stays as it was
    share = free / max(sum(sizes[i] for i in rest), 1)
    credit = float(sizes[rest[0]]) if rest else 0.0  # the first unit kept: it computes while the next is read
    for i in rest:
        if credit >= sizes[i] and sizes[i] <= free:
            chosen.add(i)
            credit -= sizes[i]
            free -= sizes[i]
        credit += share * sizes[i]
    return frozenset(chosen)


@dataclass
class ReadPolicy:
    """Per forward: the disk-tier units read directly (positions in the schedule), from the room the cache has.

    ``reserve`` is memory the forward will still take that the room reading does not see yet
    (read buffers not made so far); ``margin`` is left to the rest of the machine.
    """

    positions: list[int]  # of the units that can read directly, in execution order
    sizes: list[int]
    mode: str = "auto"  # "auto", or "direct": every unit reads directly
    room: Callable[[], int] = page_cache_room
    margin_fraction: float = 0.05
    margin_min: int = 1 << 30
    kept: frozenset[int] | None = None  # indexes into positions: last forward's mapped units
    cap: int | None = None  # at most this room: what the cache was seen to keep of the kept units
    direct: frozenset[int] = field(default_factory=frozenset)  # this forward's directly read positions
    _lost_last: bool = False  # the last forward found kept units dropped

    def decide(self, cached: Sequence[float], reserve: int = 0) -> frozenset[int]:
        """This forward's direct positions, given each unit's cached fraction now (``cached``)."""
        if self.mode == "direct":
            self.direct = frozenset(self.positions)
            return self.direct
        step = max(self.sizes, default=0)
        if self.kept is not None:
            lost = [i for i in self.kept if i < len(cached) and cached[i] < LOST]
            if lost and self._lost_last:
                # Twice running (once may be someone emptying the cache): what the cache kept of the
                # set is what it can keep for us. The cap grows back by a unit a forward without loss.
                held = sum(self.sizes[i] for i in self.kept if i < len(cached) and cached[i] >= HIT)
                self.cap = max(held - step, 0)
                log.debug("the page cache kept %d of the kept units' bytes; room capped at %d", held, self.cap)
            elif not lost and self.cap is not None:
                self.cap += step
            self._lost_last = bool(lost)
        available = self.room()
        if ENV in os.environ:  # the room was given, not measured: taken as it is
            room = available
        else:
            room = available - max(int(available * self.margin_fraction), self.margin_min) - reserve
        if self.cap is not None:
            room = min(room, self.cap)
        kept = choose_kept(self.sizes, max(room, 0), cached, self.kept)
        if kept != self.kept:
            total = sum(self.sizes)
            held = sum(self.sizes[i] for i in kept)
            log.info(
                "disk tier %.2f GiB, page-cache room %.2f GiB: %d of %d units stay cached, %.2f GiB is read directly each forward",
                total / 2**30, max(room, 0) / 2**30, len(kept), len(self.sizes), (total - held) / 2**30,
            )
        self.kept = kept
        self.direct = frozenset(p for i, p in enumerate(self.positions) if i not in kept)
        return self.direct
