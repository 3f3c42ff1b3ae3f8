"""Budgets smaller than streaming with prefetch needs: what the planner does instead of refusing.

Bringing an offloaded unit back needs room for ``1 + prefetch`` such units on the device it
is brought to (the execution device, or CPU RAM staging disk reads for a GPU). Where a
budget cannot hold that, the planner falls back, in this order, and records what it did on
the :class:`~bigjob.engine.plan.device_map.PlanSummary` (pure data; dispatch logs it once):

1. units that do not fit ``1 + prefetch`` at a time are brought back one at a time
   (prefetch lowered to 0 for them: they are not fetched ahead, and nothing is fetched ahead
   while they run; on a GPU, whose streaming buffers are shared, every offloaded unit is);
2. units larger than the budget itself are still streamed one at a time, and the expected
   peak over the budget is recorded, so dispatch can warn once.

``strict_budget=True`` (the planner's keyword, ``placement.strict_budget`` in jobs) keeps
the error instead.

>>> fallback = relax({"cpu": [0, 1]}, [300, 900], {"cpu": 1000}, prefetch=1, one_at_a_time=False)
>>> fallback.reserve, fallback.solo, fallback.over, fallback.peak
({'cpu': 900}, [1], [], {'cpu': 900})
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from bigjob.engine.plan.devices import CPU, DISK, format_size, is_accelerator
from bigjob.errors import BudgetError

__all__ = ["Relaxed", "fallback_messages", "relax", "relaxed_place", "through"]


class Relaxed(NamedTuple):
    """A fallback's reserve per device, the units it brings back one at a time or over budget (indices), the peaks."""

    reserve: dict[str, int]
    solo: list[int]  # fit once, not 1 + prefetch times: prefetch lowered to 0 for them
    over: list[int]  # larger than the budget itself: streamed anyway
    peak: dict[str, int]  # bytes expected in flight at once per device


def through(placement: Sequence[str], main: str, budgets: Mapping[str, int]) -> dict[str, list[int]]:
    """The units brought back through each device under ``placement`` (indices), as the planner reserves for them.

    >>> through(["cpu", "disk", "disk"], "cpu", {"cpu": 10, "disk": 10})
    {'cpu': [1, 2]}
    """
    streamed = [i for i, d in enumerate(placement) if d != main and not is_accelerator(d)]
    need = {main: streamed} if streamed else {}
    if is_accelerator(main) and CPU in budgets:
        from_disk = [i for i, d in enumerate(placement) if d == DISK]
        if from_disk:
            need[CPU] = from_disk  # pinned staging buffers
    return need


def relax(
    need: Mapping[str, Sequence[int]], unit_bytes: Sequence[int], budgets: Mapping[str, int], prefetch: int, one_at_a_time: bool
) -> Relaxed:
    """The smallest reserve per device that brings ``need``'s units back within its budget where any way can.

    ``one_at_a_time``: the device's streaming buffers are shared by all its units (a GPU),
    so once one unit must come alone, all do.

    >>> relax({"cpu": [0]}, [500], {"cpu": 200}, prefetch=1, one_at_a_time=False)
    Relaxed(reserve={'cpu': 200}, solo=[], over=[0], peak={'cpu': 500})
    """
    reserve: dict[str, int] = {}
    peak: dict[str, int] = {}
    solo: set[int] = set()
    over: set[int] = set()
    for device, units in need.items():
        room = budgets.get(device, 0)
        late = {i for i in units if unit_bytes[i] > room}
        alone = {i for i in units if i not in late and (1 + prefetch) * unit_bytes[i] > room}
        if one_at_a_time and (late or alone):
            alone = set(units) - late
        ahead = [unit_bytes[i] for i in units if i not in late and i not in alone]
        alone_max = max((unit_bytes[i] for i in alone | late), default=0)
        peak[device] = max((1 + prefetch) * max(ahead, default=0), alone_max)
        reserve[device] = min(room, peak[device])
        solo |= alone
        over |= late
    return Relaxed(reserve, sorted(solo - over), sorted(over), peak)


def relaxed_place(
    attempt: Callable[[dict[str, int]], list[str]],
    unit_bytes: Sequence[int],
    budgets: Mapping[str, int],
    main: str,
    prefetch: int,
    refused: BudgetError,
) -> tuple[list[str], Relaxed]:
    """A placement under a relaxed reserve and its :class:`Relaxed`; raises ``refused`` where none exists.

    Starts as if every unit were brought back, then tightens to the units the placement
    leaves offloaded while the reserve that placement needs stays within the one it was made with.
    """
    one_at_a_time = is_accelerator(main)
    everything = list(range(len(unit_bytes)))
    start = {main: everything, **({CPU: everything} if one_at_a_time and CPU in budgets and budgets.get(DISK, 0) else {})}
    relaxed = relax(start, unit_bytes, budgets, prefetch, one_at_a_time)
    try:
        placement = attempt(relaxed.reserve)
    except BudgetError:
        raise refused from None
    for _ in range(4):
        tighter = relax(through(placement, main, budgets), unit_bytes, budgets, prefetch, one_at_a_time)
        if tighter.reserve == relaxed.reserve:
            relaxed = tighter
            break
        try:
            candidate = attempt(tighter.reserve)
        except BudgetError:
            break
        again = relax(through(candidate, main, budgets), unit_bytes, budgets, prefetch, one_at_a_time)
        if any(size > tighter.reserve.get(d, 0) for d, size in again.reserve.items()):
            break
        placement, relaxed = candidate, again
    final = relax(through(placement, main, budgets), unit_bytes, budgets, prefetch, one_at_a_time)
    return placement, final._replace(reserve=relaxed.reserve)


def fallback_messages(
    solo: Sequence[str], over: Mapping[str, int], peak: Mapping[str, int], budgets: Mapping[str, int],
    resident: Mapping[str, int], prefetch: int,
) -> tuple[str | None, str | None]:
    """The INFO line (prefetch lowered) and the warning line (streamed over budget) of a plan's fallback, or ``None``.

    ``resident``: bytes planned to stay on each device (what a budget must hold besides the peak).

    >>> info, warning = fallback_messages([], {"embeddings": 1000}, {"cpu": 1000}, {"cpu": 800}, {}, 1)
    >>> print(warning)
    streaming module 'embeddings' (1000 B) one at a time on cpu peaks at about 1000 B, over max_memory['cpu']=800 B; max_memory['cpu']>=1000 B would hold it; strict_budget=True makes this an error
    """
    info = warning = None
    if solo:
        shown = ", ".join(repr(name) if name else "the whole model" for name in solo[:5]) + (f" and {len(solo) - 5} more" if len(solo) > 5 else "")
        devices = ", ".join(f"max_memory[{d!r}]={format_size(budgets.get(d, 0))}" for d in peak)
        info = (
            f"prefetch lowered from {prefetch} to 0 for {len(solo)} offloaded unit(s) that do not fit 1 + prefetch at a time "
            f"within {devices}: {shown}; they are brought back one at a time (strict_budget=True makes this an error)"
        )
    if over:
        name = max(over, key=lambda n: over[n])
        device = max((d for d in peak if peak[d] > budgets.get(d, 0)), key=lambda d: peak[d] - budgets.get(d, 0), default=None)
        if device is not None:
            more = f" (and {len(over) - 1} more unit(s) over it)" if len(over) > 1 else ""
            key = f"max_memory[{device!r}]"
            needed = peak[device] + resident.get(device, 0)
            warning = (
                f"streaming {f'module {name!r}' if name else 'the whole model'} ({format_size(over[name])}){more} one at a time on {device} peaks at about "
                f"{format_size(peak[device])}, over {key}={format_size(budgets.get(device, 0))}; "
                f"{key}>={format_size(needed)} would hold it; strict_budget=True makes this an error"
            )
    return info, warning
