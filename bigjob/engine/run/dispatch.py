"""Dispatch: attach the hooks that run a loaded model across GPUs, CPU RAM and disk, following where its weights went.

:func:`dispatch_loaded` takes a model that :func:`~bigjob.engine.run.loading.load_checkpoint_in_model`
filled and the :class:`~bigjob.engine.run.loading.LoadResult` saying where each tensor went,
and builds the :class:`~bigjob.engine.run.prefetcher.Schedule` of its offloaded units and the
hook of each: paged (:mod:`.paged_units`), streamed (:mod:`.streamed_units`) or run on the CPU
(:mod:`.local_units`), after the root hook (:mod:`.hooks`). What it made is recorded on the
model as a :class:`~bigjob.engine.run.dispatch_info.DispatchInfo`. The one-call entry points
(:func:`~bigjob.engine.run.entry_points.load_checkpoint_and_dispatch` and the others) are in
:mod:`.entry_points`.

On an accelerator, offloaded units stream their weights to it by default; ``execution=``
(``"local"``, ``"auto"`` or a policy per tier) runs some on the CPU instead, following an
:class:`~bigjob.engine.run.execution.ExecutionPlan` recorded on the ``DispatchInfo``.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from bigjob.engine.plan.budget_fallback import fallback_messages
from bigjob.engine.plan.devices import CPU, DISK, is_accelerator, normalize_device
from bigjob.engine.run.dispatch_info import DispatchInfo, remove_dispatch, set_dispatch_info
from bigjob.engine.run.execution import ExecutionRates, measure_rates, needs_rates, plan_execution, resolve_policy
from bigjob.engine.run.hooks import HookHandle, MoveInputs, RootHook, TensorSlot
from bigjob.engine.run.loading import LoadResult, check_devices
from bigjob.engine.run.local_units import AutoUnit, LocalUnit
from bigjob.engine.run.module_tensors import get_tensor, place_tensor
from bigjob.engine.run.paged_units import PagedReads, PagedUnit
from bigjob.engine.run.prefetcher import Prefetcher, Schedule
from bigjob.engine.run.read_policy import ReadPolicy
from bigjob.engine.run.stream_buffers import DeviceSlots, StagingPool
from bigjob.engine.run.streamed_units import StreamedUnit
from bigjob.engine.tiers.direct import BufferPool, DirectReads, Files, Layout
from bigjob.engine.tiers.folios import file_mappings
from bigjob.engine.tiers.pages import Range, merge, prefer_huge, release, trim_heap
from bigjob.engine.tiers.sources import Sources
from bigjob.errors import ConfigError

__all__ = ["DISK_READS", "DiskReads", "Execution", "Rates", "check_execution", "dispatch_loaded"]

log = logging.getLogger(__name__)


Execution = str | Mapping[str, str]  # "stream" | "local" | "auto", or one of them per tier {"cpu": ..., "disk": ...}
Rates = ExecutionRates | Mapping[str, str | int | float]
DiskReads = str  # "auto" | "mapped" | "direct": how disk-tier units executed on the CPU get their bytes
DISK_READS = ("auto", "mapped", "direct")


def dispatch_loaded(
    model: nn.Module,
    result: LoadResult,
    prefetch: int = 1,
    main_device: str | None = None,
    execution: Execution = "stream",
    execution_rates: Rates | None = None,
    disk_reads: DiskReads = "auto",
) -> nn.Module:
    """Attach hooks to a model that :func:`~bigjob.engine.run.loading.load_checkpoint_in_model` filled, following its placement.

    ``execution`` says how offloaded units run when the execution device is an accelerator
    (see :mod:`bigjob.engine.run.execution`): ``"stream"`` their weights there, run them
    ``"local"``-ly on the CPU, or choose per forward (``"auto"``), for all or per tier.
    ``execution_rates`` (``{"h2d": "12GB/s", "cpu_flops": ..., "device_flops": ...}``) feed
    ``auto``'s thresholds; without them they are measured once per process.

    ``disk_reads`` says how disk-tier units executed on the CPU get their bytes:
    ``"mapped"`` runs them on views of their memory-mapped files (the page cache holds the
    bytes; nothing is copied), ``"direct"`` reads them on every forward into reused buffers
    past the page cache (``O_DIRECT``), and ``"auto"`` decides at each forward's start, from the
    disk tier's size and the room the page cache has, which units stay cached (mapped) and
    which are read directly (see :mod:`bigjob.engine.run.read_policy`).
    """
    check_execution(execution, execution_rates, disk_reads)
    remove_dispatch(model)
    inventory = result.inventory
    assert inventory is not None
    main = normalize_device(main_device) if main_device else result.main_device
    rates = ExecutionRates.from_mapping(execution_rates) if execution_rates is not None else None
    check_devices([main, *result.placement.values()])
    main_dev = torch.device(main)
    tiers = result.compressed.tiers(result.placement)  # a compressed weight's parts are where the weight is
    if rates is None and needs_rates(execution, main):
        floating = (r.dtype for r in inventory.tensors.values() if r.dtype.is_floating_point)
        rates = measure_rates(main, inventory.target_dtype or next(floating, torch.float32))  # matmuls in the weights' dtype
    plan = plan_execution(inventory, tiers, main, execution, rates)
    modules = {**result.compressed.holders(), **dict(model.named_modules(remove_duplicate=False))}  # parts by name too
    summary = result.device_map.summary
    alone = set(summary.solo_units) | set(summary.over_budget) if summary is not None else set()  # units brought back alone
    asked, prefetch = prefetch, 0 if alone and is_accelerator(main) else prefetch  # a GPU's streaming buffers are shared
    prefetcher = Prefetcher(prefetch)
    schedule = Schedule(prefetcher)
    handles: list[HookHandle] = []
    tied = {name for group in inventory.tied_groups for name in group}
    tied_ranges: list[Range] = []
    streamed_views: list[Range] = []  # file views some unit maps and unmaps on every forward
    streamed = paged = local = auto = 0
    paged_units: list[PagedUnit] = []
    file_backed = set(result.zero_copy)
    if result.offload is not None:
        file_backed.update(result.offload.checkpoint.keys())
    # Model parallel: with units computing on several devices, every resident unit moves its inputs
    # to its own device (one on the main GPU may follow one on another GPU, not only the reverse).
    computing = {t for t in tiers.values() if t != DISK and not (t == CPU and is_accelerator(main))}
    several_devices = len(computing | {main}) > 1

    by_unit = inventory.tensors_by_unit()
    staging = None
    if is_accelerator(main):
        disk_sizes = [
            sum(inventory.tensors[n].nbytes + 256 for n in owned)
            for name, owned in by_unit.items()
            if any(tiers.get(n) == DISK for n in owned) and (name not in plan.decisions or plan.decisions[name].policy != "local")
        ]
        if disk_sizes:
            staging = StagingPool(max(disk_sizes), 1 + prefetch, pin=main_dev.type == "cuda")

    for unit in inventory.units:
        owned = result.compressed.expand(unit.name, by_unit[unit.name])  # compressed weights travel as their parts
        unit_tiers = {tiers[n] for n in owned}
        module = modules[unit.name] if unit.is_module else modules[unit.name.rpartition(".")[0]]
        if not unit.is_module:
            # A direct tensor of a split module is used inside that module's own forward, around its
            # children: on an accelerator it must live on the execution device (moved there once);
            # on the CPU its home (RAM or a file view) already serves.
            if is_accelerator(main):
                for name in owned:
                    place_tensor(modules, name, main_dev)
            continue
        offloaded = [n for n in owned if tiers[n] == DISK or (tiers[n] == CPU and is_accelerator(main))]
        if not offloaded:
            devices = {torch.device(t) for t in unit_tiers}
            if len(devices) == 1 and several_devices:
                handles.append(HookHandle(module, MoveInputs(next(iter(devices)))))
            continue
        # Only views of files may be released (MADV_DONTNEED): on anonymous memory it zeroes the data.
        file_views = {n: _range(modules, n) for n in offloaded if n not in tied and n in file_backed}
        views = list(file_views.values())
        ranges = merge(views)
        if is_accelerator(main):
            policy = plan.decisions[unit.name].policy
            hook: StreamedUnit | LocalUnit | AutoUnit
            if policy == "local":  # the plan never makes a unit holding tied or resident tensors local
                # Only disk-tier pages come and go per forward; CPU-tier views stay mapped, as the loader made them.
                disk_views = [view for n, view in file_views.items() if tiers[n] == DISK]
                hook = LocalUnit(unit.name, merge(disk_views), main_dev, schedule)
                streamed_views.extend(disk_views)
                local += 1
            else:
                slots = [_slot(modules, n) for n in offloaded if n not in tied]
                for n in offloaded:
                    if n in tied:
                        place_tensor(modules, n, main_dev)  # tied tensors: brought once and kept on the device
                unit_staging = staging if any(tiers[n] == DISK for n in offloaded) else None
                hook = StreamedUnit(unit.name, slots, main_dev, schedule, unit_staging, ranges if unit_staging is not None else None)
                if unit_staging is None and ranges:
                    # Packed into pinned memory: the file pages it came from are not read again, and
                    # left mapped they would count twice against the CPU budget.
                    release(ranges)
                    ranges, views = [], []
                if unit_staging is not None or policy == "auto":
                    streamed_views.extend(views)
                if policy == "auto":
                    threshold = plan.decisions[unit.name].threshold
                    assert threshold is not None
                    hook = AutoUnit(hook, LocalUnit(unit.name, ranges, main_dev, schedule), threshold, schedule)
                    auto += 1
                else:
                    streamed += 1
            hook.position = schedule.add(hook)
            handles.append(HookHandle(module, result.compressed.wrap(unit.name, hook)))  # dequantized once their bytes are in
        else:
            tied_ranges.extend(_range(modules, n) for n in offloaded if n in tied and n in file_backed)
            slots = [_slot(modules, n) for n in offloaded if n not in tied and n in file_backed]  # the order of views
            paged_unit = PagedUnit(unit.name, ranges, schedule, slots=slots)
            paged_units.append(paged_unit)
            streamed_views.extend(views)
            paged_unit.position = schedule.add(paged_unit)
            handles.append(HookHandle(module, result.compressed.wrap(unit.name, paged_unit)))
            paged += 1
    schedule.solo = {i for i, hook_unit in enumerate(schedule.units) if hook_unit.name in alone}
    if alone and summary is not None:  # the plan's fallback (bigjob.engine.plan.budget_fallback), said once per dispatch
        lowered, over = fallback_messages(
            summary.solo_units, summary.over_budget, summary.streaming_peak, summary.budgets, summary.planned_bytes, asked
        )
        for line, say in ((lowered, log.info), (over, log.warning)):
            if line:
                say("%s", line)
    if streamed or auto:
        trim_heap()  # CPU-tier homes were copied into pinned memory: their first copies are free now
    if main_dev.type == "cuda":
        sizes: dict[torch.device, int] = {}
        for hook_unit in schedule.units:
            stream = getattr(hook_unit, "stream", hook_unit)
            if isinstance(stream, StreamedUnit) and stream.device.type == "cuda" and stream.size:
                sizes[stream.device] = max(sizes.get(stream.device, 0), stream.size)
        schedule.slots = {device: DeviceSlots(device, size, 1 + prefetch) for device, size in sizes.items()}
    # Merged across units: a page two streamed units share belongs to the streamed pages too.
    streamed_pages = merge([*streamed_views, *tied_ranges])
    schedule.readahead = not prefer_huge(streamed_pages)  # see bigjob.engine.tiers.pages.populate
    if disk_reads != "mapped":
        _attach_direct_reads(paged_units, disk_reads, schedule, prefetch)
    # Folio sizes matter to pages that are mapped; units that always read directly map none.
    checked = [] if disk_reads == "direct" else streamed_pages
    homes = (slot.home for unit in schedule.units for slot in getattr(getattr(unit, "stream", unit), "slots", ()))
    sources = Sources.of(itertools.chain(model.parameters(), model.buffers(), homes))
    if result.offload is not None:
        sources.check_since(result.offload.checked)
    handles.insert(0, HookHandle(model, RootHook(main_dev, schedule, tied_ranges, checked, sources)))
    info = DispatchInfo(
        result.device_map, main, dict(result.bytes_per_tier), result.load_seconds, result.offload_folder, result.offload_reused,
        prefetch, streamed, paged, local_units=local, auto_units=auto, execution=plan, handles=handles,
        prefetcher=prefetcher, schedule=schedule, sources=sources, offload_compression=result.compressed.scheme,
    )
    if plan.decisions and is_accelerator(main):
        log.debug("execution plan on %s:\n%s", main, plan.describe())
    set_dispatch_info(model, info)
    object.__setattr__(model, "hf_device_map", result.device_map.to_hf())  # what Accelerate users read
    weakref.finalize(model, prefetcher.close)
    if schedule.reads is not None:
        weakref.finalize(model, schedule.reads.reader.close)  # the reader only: the units would keep the model alive
    return model


def check_execution(execution: Execution, execution_rates: Rates | None, disk_reads: DiskReads = "auto") -> None:
    """Refuse a bad policy, bad rates or a bad ``disk_reads`` before any weight is read (a :class:`~bigjob.errors.ConfigError`).

    >>> check_execution("auto", None, "mapped")
    >>> check_execution("stream", None, "fast")
    Traceback (most recent call last):
    ...
    bigjob.errors.ConfigError: disk_reads must be one of 'auto', 'mapped', 'direct'; got 'fast'
    """
    if disk_reads not in DISK_READS:
        raise ConfigError(f"disk_reads must be one of {', '.join(map(repr, DISK_READS))}; got {disk_reads!r}")
    resolve_policy(execution)
    if execution_rates is not None:
        ExecutionRates.from_mapping(execution_rates)


def _attach_direct_reads(units: list[PagedUnit], mode: DiskReads, schedule: Schedule, prefetch: int) -> None:
    """Give the paged units what they need to read past the page cache, and the schedule their read policy.

    A unit whose file views cannot be traced to a file that is still the one mapped keeps
    mapping only. The reads may hold ``1 + prefetch`` of the largest unit (the plan's reserve);
    one, where the plan brings such units back one at a time.
    """
    units = [u for u in units if u.slots]
    mappings = file_mappings(slot.home.data_ptr() for u in units for slot in u.slots)
    files = Files()
    usable: dict[str, bool] = {}
    layouts: list[tuple[PagedUnit, Layout]] = []
    for unit in units:
        places = []
        for slot in unit.slots:
            mapping = mappings.get(slot.home.data_ptr())
            if mapping is None:
                break
            if mapping.path not in usable:
                usable[mapping.path] = files.add(mapping.path, mapping.inode)
            if not usable[mapping.path]:
                break
            places.append((mapping.path, mapping.file_offset(slot.home.data_ptr()), slot.home.numel() * slot.home.element_size()))
        else:
            layouts.append((unit, Layout.of(places)))
    if not layouts:
        files.close()
        return
    schedule.files = files
    schedule.pool = pool = BufferPool(max(layout.size for _, layout in layouts))
    for unit, layout in layouts:
        unit.direct = DirectReads(layout, files, pool)
    direct = [unit for unit, _ in layouts]
    policy = ReadPolicy([u.position for u in direct], [layout.size for _, layout in layouts], mode=mode)
    alone = any(u.position in schedule.solo for u in direct)
    schedule.reads = PagedReads(direct, policy, pool, pool.size * (1 if alone else 1 + prefetch))


def _slot(modules: Mapping[str, nn.Module], name: str) -> TensorSlot:
    module, local, is_param, tensor = get_tensor(modules, name)
    return TensorSlot(module, local, is_param, tensor.data if is_param else tensor)


def _range(modules: Mapping[str, nn.Module], name: str) -> Range:
    _, _, _, tensor = get_tensor(modules, name)
    return Range(tensor.data_ptr(), tensor.numel() * tensor.element_size())
