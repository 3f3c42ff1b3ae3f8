"""The reserve: room kept on the execution device (and CPU RAM, staging disk reads for a GPU) to stream offloaded units back.

When anything is offloaded, room for bringing back the largest offloaded unit (times
``1 + prefetch``) is kept free of resident weights, so the budget is what the process really
uses. The reserve depends on the placement it leaves and the placement on the reserve, so
:func:`place` searches: no reserve where everything may fit; else the safe bound (any unit
could be the one brought back), tightened while it holds; and a reserve grown from nothing
where that keeps more resident (a big embedding that can stay on the GPU). Each attempt is
one :func:`~bigjob.engine.plan.fill.fill`: a bounded number of linear passes. A budget too
small for any reserve raises here; :mod:`.budget_fallback` is what the planner does then.

>>> from torch import nn
>>> from bigjob.engine.plan.fill import find_clusters
>>> from bigjob.engine.plan.inventory import build_inventory
>>> inv = build_inventory(nn.Sequential(*[nn.Linear(10, 10) for _ in range(4)]))  # 440 bytes each
>>> place(inv, find_clusters(inv), {"cpu": 1500, "disk": 10**6}, prefetch=1)  # 2 x 440 kept for streaming
(['cpu', 'disk', 'disk', 'disk'], {'cpu': 880}, 'cpu')
"""

from __future__ import annotations

from collections.abc import Mapping

from bigjob.engine.plan.devices import CPU, DISK, format_size, is_accelerator, main_device
from bigjob.engine.plan.fill import Clusters, fill, stream_sizes
from bigjob.engine.plan.inventory import Inventory
from bigjob.errors import BudgetError

__all__ = ["place"]


def place(
    inventory: Inventory, clusters: Clusters, budgets: dict[str, int], prefetch: int, stream_bytes: list[int] | None = None
) -> tuple[list[str], dict[str, int], str]:
    """Each unit's device, the reserve kept for streaming, and the execution device, under ``budgets``.

    ``stream_bytes``: each unit's bytes on a device it streams from (compressed weights,
    :func:`~bigjob.engine.plan.compression.stream_unit_bytes`); the reserve counts full bytes,
    the weights' size once brought back.
    """
    devices = [d for d, size in budgets.items() if size > 0]
    if not devices:
        raise BudgetError(f"every budget is 0 ({dict(budgets)}); give at least one device room in max_memory")
    main = main_device(budgets)
    key_hint = "max_memory"
    unit_bytes = [unit.nbytes for unit in inventory.units]
    # Every placement names only these devices, so each is classified once here rather than per unit.
    streaming = {d for d in devices if d != main and not is_accelerator(d)}  # brought to ``main`` for each use
    fast = {d for d in devices if d == main or is_accelerator(d)}
    streamed = (streaming, stream_sizes(clusters, unit_bytes, stream_bytes)) if stream_bytes is not None else None

    def attempt(reserve: dict[str, int]) -> list[str]:
        capacity = {d: max(0, budgets[d] - reserve.get(d, 0)) for d in devices}
        return fill(inventory, clusters, devices, capacity, key_hint, streamed)

    def needed(placement: list[str]) -> dict[str, int]:
        """Room the dispatcher needs to bring offloaded units to the execution device."""
        streamed = [nbytes for nbytes, d in zip(unit_bytes, placement) if d in streaming]
        from_disk = [nbytes for nbytes, d in zip(unit_bytes, placement) if d == DISK]
        reserve: dict[str, int] = {}
        if streamed:
            reserve[main] = (1 + prefetch) * max(streamed)
        if is_accelerator(main) and from_disk and CPU in budgets:
            reserve[CPU] = (1 + prefetch) * max(from_disk)  # pinned staging buffers
        return reserve

    def covers(placement: list[str], reserve: dict[str, int]) -> bool:
        return all(size <= reserve.get(d, 0) for d, size in needed(placement).items())

    def fits(reserve: dict[str, int]) -> bool:
        return all(size <= budgets.get(d, 0) for d, size in reserve.items())

    def tried(reserve: dict[str, int]) -> list[str] | BudgetError:
        try:
            return attempt(reserve)
        except BudgetError as err:
            return err

    def grow() -> tuple[list[str] | BudgetError, dict[str, int]]:
        """Grow a reserve from nothing until the placement it leaves needs no more (the last attempt, its reserve).

        Finds smaller reserves than the safe bound when the largest units can stay resident
        (a big embedding on the GPU), where the safe bound would push them off it.
        """
        grown: dict[str, int] = {}
        candidate = bare if bare is not None else tried(grown)
        for _ in range(8):
            if not isinstance(candidate, list) or covers(candidate, grown):
                break
            need = needed(candidate)
            grown = {d: max(grown.get(d, 0), need.get(d, 0)) for d in (*grown, *need)}
            if not fits(grown):
                break
            candidate = tried(grown)
        return candidate, grown

    def resident_bytes(placement: list[str]) -> tuple[int, int]:
        """Bytes that need no streaming, then bytes in CPU RAM: more is better."""
        kept = ram = 0
        for nbytes, device in zip(unit_bytes, placement):
            if device in fast:
                kept += nbytes
            elif device == CPU:
                ram += nbytes
        return kept, ram

    # Where everything might fit on the devices that run it, try first without any reserve.
    resident = sum(
        size for d, size in budgets.items() if d == main or is_accelerator(d) or (d == CPU and not is_accelerator(main))
    )
    bare: list[str] | BudgetError | None = tried({}) if inventory.total_bytes <= resident else None
    placement: list[str] | None = bare if isinstance(bare, list) else None
    reserve: dict[str, int] = {}
    if placement is None or needed(placement):
        placement = None
        # Start from the safe bound (any unit could be the one brought back), then tighten while it holds.
        largest_unit = max(unit_bytes, default=0)
        safe = {main: (1 + prefetch) * largest_unit}
        if is_accelerator(main) and CPU in budgets and DISK in devices:
            safe[CPU] = (1 + prefetch) * largest_unit  # staging from disk: only when disk may be used at all
        first = tried(safe)
        if isinstance(first, list):
            placement, reserve = first, safe
            for _ in range(4):
                tighter = needed(placement)
                if tighter == reserve:
                    break
                candidate = tried(tighter)
                if not isinstance(candidate, list) or not covers(candidate, tighter):
                    break
                placement, reserve = candidate, tighter
        worth_growing = placement is None or not fits(reserve)
        if not worth_growing and reserve.get(main, 0) == safe[main] and largest_unit:
            # The safe bound held, but a smaller reserve may keep more resident if every largest unit can stay.
            # Clusters, not units: a tied embedding and head are two largest units holding one tensor.
            heads = {clusters.head[i] for i, nbytes in enumerate(unit_bytes) if nbytes == largest_unit}
            biggest = sum(clusters.nbytes[head] for head in heads)
            runner_up = max((nbytes for nbytes in unit_bytes if nbytes < largest_unit), default=0)
            worth_growing = biggest + (1 + prefetch) * runner_up <= resident
        if worth_growing:
            candidate, grown = grow()
            works = isinstance(candidate, list) and covers(candidate, grown) and fits(grown)
            if works and (placement is None or not fits(reserve) or resident_bytes(candidate) > resident_bytes(placement)):
                placement, reserve = candidate, grown  # type: ignore[assignment]
            if placement is None:  # the safe bound failed too (``first`` is its error)
                if isinstance(candidate, list) and not fits(grown):
                    raise _reserve_too_big(inventory, candidate, grown, budgets, main, prefetch, key_hint)
                raise candidate if isinstance(candidate, BudgetError) else first  # type: ignore[misc]
        if not fits(reserve):
            raise _reserve_too_big(inventory, placement, reserve, budgets, main, prefetch, key_hint)
    return placement, reserve, main


def _reserve_too_big(
    inventory: Inventory,
    placement: list[str],
    reserve: Mapping[str, int],
    budgets: Mapping[str, int],
    main: str,
    prefetch: int,
    key_hint: str,
) -> BudgetError:
    device = next(d for d, size in reserve.items() if size > budgets.get(d, 0))
    offloaded = [(u.nbytes, u.name) for u, d in zip(inventory.units, placement) if d == DISK or (d != main and not is_accelerator(d))]
    nbytes, name = max(offloaded, default=(0, "?"))
    why = "the execution device" if device == main else "CPU RAM, where units read from disk are staged"
    return BudgetError(
        f"bringing offloaded module {name!r} ({format_size(nbytes)}) back needs {format_size(reserve[device])} "
        f"((1 + prefetch={prefetch}) x its size) on {device} ({why}), but {key_hint}[{device!r}] is "
        f"{format_size(budgets.get(device, 0))}; raise {key_hint}[{device!r}] or lower prefetch"
    )
