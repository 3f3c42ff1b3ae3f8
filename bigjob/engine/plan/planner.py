"""The planner: where every weight lives under per-device budgets. Pure functions over an :class:`Inventory`.

:func:`plan` puts the steps together: the budgets in device order, less the forward's
working memory on the execution device; balanced GPU budgets (:mod:`.balance`) for the
balanced strategies while the model fits on the GPUs; the fill of devices in definition
order (:mod:`.fill`) under the budgets less the reserve kept for streaming offloaded units
back (:mod:`.reserve`); where a budget is too small for that reserve, the fallback
(prefetch lowered, then one unit at a time over the budget; recorded on the plan, see
:mod:`.budget_fallback`) unless ``strict_budget``; and the map entries at the highest
module prefixes whose units share a device. Time is linear in the number of units (a
bounded number of linear passes). The entry points over a model are in :mod:`.resolution`.

>>> from torch import nn
>>> from bigjob.engine.plan.inventory import build_inventory
>>> inv = build_inventory(nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)]))  # 4 x 263,168 bytes
>>> dict(plan(inv, {"cpu": 900_000, "disk": 10**9}))  # 2 x 263,168 kept for streaming
{'0': 'cpu', '1': 'disk', '2': 'disk', '3': 'disk'}
"""

from __future__ import annotations

from collections.abc import Mapping

from bigjob.engine.plan.balance import balanced_budgets
from bigjob.engine.plan.budget_fallback import relaxed_place
from bigjob.engine.plan.device_map import DeviceMap, PlanSummary
from bigjob.engine.plan.compression import stream_unit_bytes
from bigjob.engine.plan.devices import device_order, format_size, is_accelerator, main_device, normalize_device
from bigjob.engine.plan.fill import fill, find_clusters, stream_sizes
from bigjob.engine.plan.inventory import Inventory
from bigjob.engine.plan.reserve import place
from bigjob.errors import BudgetError, ConfigError

__all__ = ["PLANNER_VERSION", "STRATEGIES", "plan"]


# Bump whenever a change could make the same inputs give a different map: it is part of cache keys.
PLANNER_VERSION = "2"
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def plan(
    inventory: Inventory, budgets: Mapping[str, int], strategy: str = "auto", prefetch: int = 1, working_memory: int = 0,
    *, strict_budget: bool = False, offload_compression: str = "none",
) -> DeviceMap:
    """The device map for ``inventory`` under ``budgets`` (canonical device -> bytes). Pure.

    ``working_memory``: bytes the forward itself needs on the execution device (activations,
    outputs, caches; see :func:`~bigjob.engine.plan.working_memory.estimate_working_memory`),
    kept free of weights and streaming buffers there. ``strict_budget``: raise where the budgets
    cannot hold ``1 + prefetch`` offloaded units at a time, rather than fall back.
    ``offload_compression``: units count their compressed bytes on the devices they stream
    from (disk; CPU RAM for an accelerator), their full bytes in the reserve (:mod:`.compression`).

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import build_inventory
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
    runs_on = main_device(budgets)
    if working_memory:
        if working_memory >= budgets.get(runs_on, 0):
            raise BudgetError(
                f"the forward's working memory ({format_size(working_memory)}, working_memory) leaves no room for weights "
                f"on {runs_on}, the device that runs the model (budget {format_size(budgets.get(runs_on, 0))}); raise "
                f"max_memory[{runs_on!r}] or run smaller batches (working memory grows with the batch)"
            )
        budgets[runs_on] -= working_memory
    stream_bytes = stream_unit_bytes(inventory, offload_compression)
    try:
        return _plan(inventory, budgets, strategy, prefetch, working_memory, runs_on, strict_budget, stream_bytes)
    except BudgetError as err:
        if not working_memory:
            raise
        raise BudgetError(
            f"{err} (budgets here are net of the {format_size(working_memory)} kept free on {runs_on} for the "
            "forward's working memory, working_memory)"
        ) from None


def _plan(
    inventory: Inventory, budgets: dict[str, int], strategy: str, prefetch: int, working_memory: int, runs_on: str, strict: bool,
    stream_bytes: list[int] | None,
) -> DeviceMap:
    clusters = find_clusters(inventory)
    # Units stream from every device other than the one running the model and accelerators (as reserve.place has it).
    streaming = {d for d in budgets if d != runs_on and not is_accelerator(d)}
    streamed = (streaming, stream_sizes(clusters, [u.nbytes for u in inventory.units], stream_bytes)) if stream_bytes is not None else None
    placement: list[str] | None = None
    if strategy in ("auto", "balanced", "balanced_low_0"):
        balanced = balanced_budgets(inventory, budgets, low_zero=strategy == "balanced_low_0")
        if balanced != budgets:
            # Balancing only matters while the model fits on the GPUs: once anything is offloaded
            # they are full anyway, and a balanced (smaller) budget would only squeeze the reserve.
            try:
                placement, reserve, main = place(inventory, clusters, balanced, prefetch, stream_bytes)
            except BudgetError:
                placement = None
            if placement is not None and not reserve:
                budgets = balanced
            else:
                placement = None
    relaxed = None
    if placement is None:
        try:
            placement, reserve, main = place(inventory, clusters, budgets, prefetch, stream_bytes)
        except BudgetError as refused:
            if strict:
                raise
            main, devices = main_device(budgets), [d for d, size in budgets.items() if size > 0]
            fill_under = lambda held: fill(inventory, clusters, devices, {d: max(0, budgets[d] - held.get(d, 0)) for d in devices}, "max_memory", streamed)  # noqa: E731
            placement, relaxed = relaxed_place(fill_under, [u.nbytes for u in inventory.units], budgets, main, prefetch, refused)
            reserve = relaxed.reserve
    planned: dict[str, int] = {}
    counts: dict[str, int] = {}
    heads, sizes = clusters.head, clusters.nbytes
    for i, device in enumerate(placement):
        counts[device] = counts.get(device, 0) + 1
        if heads[i] == i:  # a cluster's bytes are counted at its first unit
            table = streamed[1] if streamed is not None and device in streamed[0] else sizes
            planned[device] = planned.get(device, 0) + table[i]
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
