"""The planner: where every weight lives under per-device budgets. Pure functions over an :class:`Inventory`.

Units (leaves, no-split modules, direct tensors of split modules) are taken in definition
order and each goes to the fastest device, at or after the one being filled, that still has
room. A device is not abandoned because one unit did not fit: smaller units after it still
go there, and the planner only moves on once nothing left could fit. Tied tensors travel
together. When anything is offloaded, room for bringing back the largest offloaded unit
(times ``1 + prefetch``) is kept on the execution device, so the budget is what the process
really uses. A budget too small for that falls back (prefetch lowered, then one unit at a time
over the budget; recorded on the plan, see :mod:`.budget_fallback`) unless ``strict_budget``. The
balanced strategies use balanced GPU budgets only while the model fits on the GPUs. Time is
linear in the number of units (a bounded number of linear passes).

>>> from torch import nn
>>> model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])  # 4 x 263,168 bytes
>>> dm = infer_auto_device_map(model, max_memory={"cpu": 900_000})  # 2 x 263,168 kept for streaming
>>> dict(dm)
{'0': 'cpu', '1': 'disk', '2': 'disk', '3': 'disk'}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from itertools import accumulate
from typing import NamedTuple

import torch
from torch import nn

from bigjob.engine.plan.device_map import DeviceMap, PlanSummary, assign_tensors, summarize
from bigjob.engine.plan.budget_fallback import relaxed_place
from bigjob.engine.plan.devices import CPU, DISK, UNLIMITED, device_order, format_size, get_max_memory, is_accelerator, normalize_device, parse_size
from bigjob.engine.plan.inventory import Inventory, Unit, build_inventory
from bigjob.engine.plan.module_tree import no_gc
from bigjob.errors import BudgetError, ConfigError

__all__ = ["PLANNER_VERSION", "STRATEGIES", "get_balanced_memory", "infer_auto_device_map", "plan", "resolve_device_map"]

log = logging.getLogger(__name__)

# Bump whenever a change could make the same inputs give a different map: it is part of cache keys.
PLANNER_VERSION = "2"
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


class _Clusters(NamedTuple):
    """Units that must share a device (tied tensors), as lists indexed by unit; an untied unit is a cluster of one.

    A cluster is named by its first unit (its head); its bytes count each tied tensor once.
    """

    head: list[int]  # each unit's cluster
    nbytes: list[int]  # each unit's cluster bytes
    members: dict[int, tuple[int, ...]]  # the units of each cluster of several, by head

    def units_of(self, head: int) -> tuple[int, ...]:
        """The units of the cluster headed by unit ``head``, in definition order."""
        return self.members.get(head, (head,))


def _clusters(inventory: Inventory) -> _Clusters:
    """Group the units that hold aliases of one tensor.

    Untied units are their own cluster; only tied tensor names are looked up, so this is
    linear in the number of units plus the (few) tied names.
    """
    units = inventory.units
    clusters = _Clusters(list(range(len(units))), [unit.nbytes for unit in units], {})
    if not inventory.tied_groups:
        return clusters
    unit_index = {unit.name: i for i, unit in enumerate(units)}

    def unit_holding(tensor_name: str) -> int | None:
        prefix = tensor_name
        while True:
            if prefix in unit_index:
                return unit_index[prefix]
            if not prefix:
                return None
            prefix = prefix.rpartition(".")[0]

    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holding: list[list[int]] = []
    for group in inventory.tied_groups:
        members = sorted({i for i in (unit_holding(name) for name in group) if i is not None})
        holding.append(members)
        for other in members[1:]:
            a, b = find(members[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in sorted({i for members in holding for i in members}):
        groups.setdefault(find(i), []).append(i)
    # A tied tensor held by k units of one cluster was counted k times in their sizes.
    extra: dict[int, int] = {}
    for group, members in zip(inventory.tied_groups, holding):
        if len(members) > 1:
            root = find(members[0])
            extra[root] = extra.get(root, 0) + (len(members) - 1) * inventory.tensor(group[0]).nbytes
    for root, members in groups.items():
        if len(members) == 1:
            continue
        merged = sum(units[i].nbytes for i in members) - extra.get(root, 0)
        clusters.members[members[0]] = tuple(members)
        for i in members:
            clusters.head[i] = members[0]
            clusters.nbytes[i] = merged
    return clusters


def _fill(
    inventory: Inventory,
    clusters: _Clusters,
    devices: list[str],
    capacity: dict[str, int],
    key_hint: str,
) -> list[str]:
    """Device of each unit: first device at or after the current one with room; linear in units."""
    units = inventory.units
    sizes = clusters.nbytes
    tied = clusters.members
    room = [capacity[d] for d in devices]
    last = len(devices) - 1
    # Smallest cluster from unit i on: once the current device cannot hold it, nothing later fits there.
    suffix_min = list(accumulate(reversed(sizes), min, initial=UNLIMITED))
    suffix_min.reverse()
    placed: list[str | None] = [None] * len(units)
    current = 0
    for i, nbytes in enumerate(sizes):
        if placed[i] is not None:
            continue  # placed with the head of its cluster
        target = current
        while target <= last and room[target] < nbytes:
            target += 1
        if target > last:
            raise _too_big(units, clusters.units_of(i), nbytes, devices, room, [capacity[d] for d in devices], key_hint)
        room[target] -= nbytes
        device = devices[target]
        if i in tied:
            for member in tied[i]:
                placed[member] = device
        else:
            placed[i] = device
        while current < last and room[current] < suffix_min[i + 1]:
            current += 1
    return [device or devices[-1] for device in placed]


def _too_big(
    units: list[Unit],
    members: tuple[int, ...],
    nbytes: int,
    devices: list[str],
    room: list[int],
    capacity: list[int],
    key_hint: str,
) -> BudgetError:
    names = [units[i].name for i in members]
    what = f"module {names[0]!r}" if len(names) == 1 else f"tied modules {names}"
    disk = "" if DISK in devices else " or allow disk offload (max_memory['disk'] > 0)"
    if nbytes > max(capacity):  # no budget could ever hold it
        best = max(range(len(devices)), key=lambda j: capacity[j])
        return BudgetError(
            f"{what} needs {format_size(nbytes)} but the largest budget is "
            f"{format_size(capacity[best])} ({devices[best]}); raise {key_hint}[{devices[best]!r}]{disk}"
        )
    best = max(range(len(devices)), key=lambda j: room[j])
    return BudgetError(
        f"{what} needs {format_size(nbytes)} but the largest budget left is "
        f"{format_size(room[best])} ({devices[best]}); raise {key_hint}[{devices[best]!r}]{disk}"
    )


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


def _main_device(budgets: Mapping[str, int]) -> str:
    for device, size in budgets.items():
        if is_accelerator(device) and size > 0:
            return device
    return CPU


def get_balanced_memory(
    model: nn.Module | Inventory,
    max_memory: Mapping[str | int, str | int] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    low_zero: bool = False,
) -> dict[str, int]:
    """Per-device budgets that spread the model evenly over the GPUs (GPU 0 kept light with ``low_zero``).

    Each GPU's budget becomes about its share of the model plus one largest unit (so a
    whole unit always fits), never more than it has; a GPU too small for an even share keeps
    what it has and the others share the rest. CPU, MPS and disk budgets are unchanged.

    >>> from torch import nn
    >>> model = nn.Sequential(*[nn.Linear(100, 100) for _ in range(4)])  # 4 x 40,400 bytes
    >>> budgets = get_balanced_memory(model, {"cuda:0": 10**6, "cuda:1": 10**6, "cpu": 10**6})
    >>> budgets["cuda:0"], budgets["cuda:1"]
    (121200, 121200)
    """
    inventory = (
        model if isinstance(model, Inventory) else build_inventory(model, dtype, special_dtypes, no_split_module_classes)
    )
    budgets = get_max_memory(max_memory)
    return _balanced(inventory, budgets, low_zero)


def _balanced(inventory: Inventory, budgets: Mapping[str, int], low_zero: bool) -> dict[str, int]:
    gpus = [d for d, size in budgets.items() if d.startswith("cuda:") and size > 0]
    if len(gpus) < 2:
        return dict(budgets)
    total = inventory.total_bytes
    largest = max((unit.nbytes for unit in inventory.units), default=0)
    out = dict(budgets)
    sharing = gpus[1:] if low_zero else gpus
    # Water-filling: a GPU too small for an even share takes what it has, the others the rest.
    level = _water_level([budgets[gpu] for gpu in sharing], total)
    for gpu in sharing:
        out[gpu] = min(budgets[gpu], level + largest)
    if low_zero:
        rest = sum(out[g] for g in sharing)
        out[gpus[0]] = min(budgets[gpus[0]], max(0, total - rest) + largest)
    return out


def _water_level(capacities: list[int], total: int) -> int:
    """The smallest level with ``sum(min(c, level)) >= total`` (the largest capacity if none reaches it).

    >>> _water_level([100, 100], 120), _water_level([10, 100, 100], 120), _water_level([10, 20], 120)
    (60, 55, 20)
    """
    remaining = total
    ordered = sorted(capacities)
    for i, capacity in enumerate(ordered):
        sharers = len(ordered) - i
        if capacity * sharers >= remaining:
            return -(-remaining // sharers)
        remaining -= capacity
    return ordered[-1] if ordered else 0


def plan(
    inventory: Inventory, budgets: Mapping[str, int], strategy: str = "auto", prefetch: int = 1, working_memory: int = 0,
    *, strict_budget: bool = False,
) -> DeviceMap:
    """The device map for ``inventory`` under ``budgets`` (canonical device -> bytes). Pure.

    ``working_memory``: bytes the forward itself needs on the execution device (activations,
    outputs, caches; see :func:`~bigjob.engine.plan.working_memory.estimate_working_memory`),
    kept free of weights and streaming buffers there. ``strict_budget``: raise where the budgets
    cannot hold ``1 + prefetch`` offloaded units at a time, rather than fall back.

    >>> from torch import nn
    >>> inv = build_inventory(nn.Sequential(*[nn.Linear(10, 10) for _ in range(3)]))  # 440 bytes each
    >>> dict(plan(inv, {"cuda:0": 1000, "cpu": 10_000, "disk": 0}, "sequential", prefetch=0))
    {'0': 'cuda:0', '1': 'cpu', '2': 'cpu'}
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown placement strategy {strategy!r}; use one of {list(STRATEGIES)} or an explicit map")
    if prefetch < 0:
        raise ConfigError(f"prefetch={prefetch} is negative; use 0 (no prefetch) or more")
    # Fastest devices first, whatever order the caller wrote them in.
    ordered: dict[str, int] = {}
    for device, size in budgets.items():
        ordered[normalize_device(device)] = int(size)
    budgets = dict(sorted(ordered.items(), key=lambda item: device_order(item[0])))
    if working_memory < 0:
        raise ConfigError(f"working_memory={working_memory} is negative; give the forward's working memory in bytes (0: none)")
    runs_on = _main_device(budgets)
    if working_memory:
        if working_memory >= budgets.get(runs_on, 0):
            raise BudgetError(
                f"the forward's working memory ({format_size(working_memory)}, working_memory) leaves no room for weights "
                f"on {runs_on}, the device that runs the model (budget {format_size(budgets.get(runs_on, 0))}); raise "
                f"max_memory[{runs_on!r}] or run smaller batches (working memory grows with the batch)"
            )
        budgets[runs_on] -= working_memory
    try:
        return _plan(inventory, budgets, strategy, prefetch, working_memory, runs_on, strict_budget)
    except BudgetError as err:
        if not working_memory:
            raise
        raise BudgetError(
            f"{err} (budgets here are net of the {format_size(working_memory)} kept free on {runs_on} for the "
            "forward's working memory, working_memory)"
        ) from None


def _plan(
    inventory: Inventory, budgets: dict[str, int], strategy: str, prefetch: int, working_memory: int, runs_on: str, strict: bool
) -> DeviceMap:
    clusters = _clusters(inventory)
    placement: list[str] | None = None
    if strategy in ("auto", "balanced", "balanced_low_0"):
        balanced = _balanced(inventory, budgets, low_zero=strategy == "balanced_low_0")
        if balanced != budgets:
            # Balancing only matters while the model fits on the GPUs: once anything is offloaded
            # they are full anyway, and a balanced (smaller) budget would only squeeze the reserve.
            try:
                placement, reserve, main = _place(inventory, clusters, balanced, prefetch)
            except BudgetError:
                placement = None
            if placement is not None and not reserve:
                budgets = balanced
            else:
                placement = None
    relaxed = None
    if placement is None:
        try:
            placement, reserve, main = _place(inventory, clusters, budgets, prefetch)
        except BudgetError as refused:
            if strict:
                raise
            main, devices = _main_device(budgets), [d for d, size in budgets.items() if size > 0]
            fill = lambda held: _fill(inventory, clusters, devices, {d: max(0, budgets[d] - held.get(d, 0)) for d in devices}, "max_memory")  # noqa: E731
            placement, relaxed = relaxed_place(fill, [u.nbytes for u in inventory.units], budgets, main, prefetch, refused)
            reserve = relaxed.reserve
    planned: dict[str, int] = {}
    counts: dict[str, int] = {}
    heads, sizes = clusters.head, clusters.nbytes
    for i, device in enumerate(placement):
        counts[device] = counts.get(device, 0) + 1
        if heads[i] == i:  # a cluster's bytes are counted at its first unit
            planned[device] = planned.get(device, 0) + sizes[i]
    target = inventory.target_dtype
    given = dict(budgets)
    if working_memory:
        given[runs_on] += working_memory  # the summary shows the budgets as given, the working memory beside them
    names = [unit.name for unit in inventory.units]
    summary = PlanSummary(
        strategy, given, planned, counts, main, reserve=reserve, dtype=str(target).removeprefix("torch.") if target else None,
        total_bytes=inventory.total_bytes, working_memory=working_memory,
        solo_units=[names[i] for i in relaxed.solo] if relaxed else [],
        over_budget={names[i]: inventory.units[i].nbytes for i in relaxed.over} if relaxed else {},
        streaming_peak=dict(relaxed.peak) if relaxed and (relaxed.solo or relaxed.over) else {},
    )
    return DeviceMap._trusted(_collapse(inventory, placement), summary)


def _place(
    inventory: Inventory, clusters: _Clusters, budgets: dict[str, int], prefetch: int
) -> tuple[list[str], dict[str, int], str]:
    """Each unit's device, the reserve kept for streaming, and the execution device, under ``budgets``."""
    devices = [d for d, size in budgets.items() if size > 0]
    if not devices:
        raise BudgetError(f"every budget is 0 ({dict(budgets)}); give at least one device room in max_memory")
    main = _main_device(budgets)
    key_hint = "max_memory"
    unit_bytes = [unit.nbytes for unit in inventory.units]
    # Every placement names only these devices, so each is classified once here rather than per unit.
    streaming = {d for d in devices if d != main and not is_accelerator(d)}  # brought to ``main`` for each use
    fast = {d for d in devices if d == main or is_accelerator(d)}

    def attempt(reserve: dict[str, int]) -> list[str]:
        capacity = {d: max(0, budgets[d] - reserve.get(d, 0)) for d in devices}
        return _fill(inventory, clusters, devices, capacity, key_hint)

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


_MIXED = "<mixed>"


def _collapse(inventory: Inventory, placement: list[str]) -> dict[str, str]:
    """Map entries at the highest module prefixes whose units all share a device (amortised linear).

    Units come in definition order, so the units under one entry come in a run: once a unit's
    entry is found by walking up its prefixes, the units after it under that entry need no walk.
    """
    state: dict[str, str] = {}  # prefix -> its one device, or _MIXED
    for unit, device in zip(inventory.units, placement):
        prefix = unit.name
        while True:
            seen = state.get(prefix)
            if seen == device or seen == _MIXED:
                break  # ancestors already hold this device, or are mixed
            state[prefix] = device if seen is None else _MIXED
            if not prefix:
                break
            prefix = prefix.rpartition(".")[0]
    entries: dict[str, str] = {}
    covered: str | None = None  # the last entry, while all its units share one device
    inside = ""  # its names' prefix ("" for the root: every name)
    for unit, device in zip(inventory.units, placement):
        name = unit.name
        if covered is not None and (name.startswith(inside) or name == covered):
            continue
        top = name
        while top:
            parent = top.rpartition(".")[0]
            if state[parent] == _MIXED:
                break
            top = parent
        entries.setdefault(top, device)
        if state[top] == _MIXED:  # a unit named like a prefix of units elsewhere (unheard of): no run
            covered = None
        else:
            covered, inside = top, (top + "." if top else "")
    return entries


def infer_auto_device_map(
    model: nn.Module,
    max_memory: Mapping[str | int, str | int] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    strategy: str = "auto",
    prefetch: int = 1,
    *,
    inventory: Inventory | None = None,
    working_memory: int | str = 0,
    strict_budget: bool = False,
) -> DeviceMap:
    """Plan where each module of ``model`` (empty or not) lives, GPUs first, then CPU, then disk.

    ``max_memory`` overrides the detected free memory per device (keys: GPU index,
    ``"cuda:N"``, ``"gpuN"``, ``"mps"``, ``"cpu"``, ``"disk"``; values: bytes or sizes such
    as ``"10GiB"`` or ``"90%"``). Devices named but absent here are planned for all the same.
    ``working_memory`` (bytes or a size) is kept free on the device that runs the model, for
    the forward's activations and outputs, so that weights and working memory together stay
    within its budget; :func:`~bigjob.engine.plan.working_memory.estimate_working_memory` measures
    it for a batch.
    ``inventory``: the model's :func:`build_inventory` for these arguments, when the caller
    already has it (it is not built twice). A budget too small to bring offloaded units back
    ``1 + prefetch`` at a time lowers prefetch for them, then streams units larger than it
    anyway (the plan records it; dispatch logs it once); ``strict_budget=True`` raises instead.

    >>> from torch import nn
    >>> model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(4)])  # 16,640 bytes each
    >>> dm = infer_auto_device_map(model, max_memory={"cuda:0": 40_000, "cuda:1": 40_000, "cpu": 10**6}, strategy="sequential")
    >>> dict(dm)
    {'0': 'cuda:0', '1': 'cuda:0', '2': 'cuda:1', '3': 'cuda:1'}
    """
    no_split = list(no_split_module_classes or ())
    budgets = get_max_memory(max_memory)
    with no_gc():
        if inventory is None:
            inventory = build_inventory(model, dtype, special_dtypes, no_split)
        classes = set(inventory.module_classes.values())
        device_map = plan(inventory, budgets, strategy, prefetch, parse_size(working_memory, key="working_memory"), strict_budget=strict_budget)
        del inventory  # freed here, with the collector still paused
    for name in no_split:
        if name not in classes:
            log.warning("no_split_module_classes names %r, but no module of the model has that class", name)
    return device_map


def resolve_device_map(
    model: nn.Module,
    device_map: str | int | torch.device | Mapping[str, str | int] | DeviceMap,
    max_memory: Mapping[str | int, str | int] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    prefetch: int = 1,
    *,
    inventory: Inventory | None = None,
    working_memory: int | str = 0,
    strict_budget: bool = False,
) -> DeviceMap:
    """Any accepted ``device_map`` argument as a checked :class:`DeviceMap`.

    A strategy name plans; a device (``"cpu"``, ``"cuda:0"``, ``0``, ``"disk"``) puts the whole
    model there; a mapping is checked against the model.

    >>> from torch import nn
    >>> dict(resolve_device_map(nn.Linear(2, 2), "cpu"))
    {'': 'cpu'}
    """
    if isinstance(device_map, str) and device_map in STRATEGIES:
        return infer_auto_device_map(
            model, max_memory, no_split_module_classes, dtype, special_dtypes, device_map, prefetch,
            inventory=inventory, working_memory=working_memory, strict_budget=strict_budget,
        )
    if parse_size(working_memory, key="working_memory"):
        raise ConfigError(
            f"working_memory={working_memory!r} only shapes a map bigjob plans (device_map one of {list(STRATEGIES)}); "
            f"device_map={device_map!r} is used as given: drop working_memory, or plan with device_map='auto'"
        )
    if isinstance(device_map, (str, int, torch.device)):
        try:
            device = normalize_device(device_map, key="device_map")
        except BudgetError:
            raise ConfigError(
                f"device_map={device_map!r} is neither a strategy {list(STRATEGIES)} nor a device ('cpu', 'cuda:0', 'disk', ...)"
            ) from None
        resolved = DeviceMap({"": device})
    elif isinstance(device_map, Mapping):
        resolved = device_map if isinstance(device_map, DeviceMap) else DeviceMap(device_map)
    else:
        raise ConfigError(f"device_map={device_map!r} is not a strategy name, a device or a mapping")
    if inventory is None:
        inventory = build_inventory(model, dtype, special_dtypes, no_split_module_classes)
    assign_tensors(inventory, resolved)
    if resolved.summary is None:
        budgets = {d: 0 for d in resolved.devices}
        main = _main_device({d: 1 for d in resolved.devices})
        return DeviceMap(resolved, summarize(inventory, resolved, budgets, "explicit", main))
    return resolved
