"""Dispatch: attach the hooks that run a loaded model across GPUs, CPU RAM and disk.

:func:`load_checkpoint_and_dispatch` is the one-call path of the big-model tutorial::

    with init_empty_weights():
        model = MyModel(...)
    model = load_checkpoint_and_dispatch(model, checkpoint=path, device_map="auto")

The returned model is the same object, with hooks; :func:`remove_dispatch` takes them off
again, and :func:`get_dispatch_info` says where the weights went and what loading cost.

On an accelerator, offloaded units stream their weights to it by default; ``execution=``
(``"local"``, ``"auto"`` or a policy per tier) runs some on the CPU instead, following an
:class:`~bigjob.engine.run.execution.ExecutionPlan` recorded on the :class:`DispatchInfo`.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bigjob.engine.plan.budget_fallback import fallback_messages
from bigjob.engine.checkpoints.checkpoint import Checkpoint
from bigjob.engine.plan.device_map import DeviceMap, assign_tensors
from bigjob.engine.tiers.direct import BufferPool, DirectReads, Files, Layout
from bigjob.engine.plan.devices import CPU, DISK, is_accelerator, normalize_device
from bigjob.engine.run.execution import ExecutionPlan, ExecutionRates, measure_rates, needs_rates, plan_execution, resolve_policy
from bigjob.engine.run.hooks import (
    DeviceSlots, HookHandle, MoveInputs, PagedUnit, Prefetcher, RootHook, Schedule, StagingPool, StreamedUnit, TensorSlot,
)
from bigjob.engine.run.local_units import AutoUnit, LocalUnit
from bigjob.engine.run.loading import LoadResult, check_devices, load_checkpoint_in_model, set_tensor
from bigjob.engine.tiers.folios import file_mappings
from bigjob.engine.tiers.pages import Range, merge, prefer_huge, release, trim_heap
from bigjob.engine.tiers.sources import Sources
from bigjob.engine.plan.planner import resolve_device_map
from bigjob.engine.plan.sizes import build_inventory
from bigjob.engine.tiers.store import OffloadEntry, prepare_offload_folder
from bigjob.errors import ConfigError, OffloadError

__all__ = [
    "DispatchInfo", "cpu_offload", "disk_offload", "dispatch_model", "execution_tokens", "get_dispatch_info",
    "load_checkpoint_and_dispatch", "remove_dispatch",
]

log = logging.getLogger(__name__)

_ATTR = "_bigjob_dispatch"


Execution = str | Mapping[str, str]  # "stream" | "local" | "auto", or one of them per tier {"cpu": ..., "disk": ...}
Rates = ExecutionRates | Mapping[str, str | int | float]
DiskReads = str  # "auto" | "mapped" | "direct": how disk-tier units executed on the CPU get their bytes
DISK_READS = ("auto", "mapped", "direct")


@dataclass
class DispatchInfo:
    """What a dispatched model is: its map, execution device, bytes per tier and load figures.

    ``streamed_units`` always stream to the accelerator, ``local_units`` always run on the
    CPU there, ``auto_units`` choose per forward (see :attr:`execution`); ``paged_units`` are
    disk-tier units of a model executing on the CPU. ``sources`` are the files its weights are
    views of, checked before every forward for a change in place (see :mod:`bigjob.engine.tiers.sources`).
    """

    device_map: DeviceMap
    main_device: str
    bytes_per_tier: dict[str, int]
    load_seconds: float
    offload_folder: str | None
    offload_reused: bool | None
    prefetch: int
    streamed_units: int
    paged_units: int
    local_units: int = 0
    auto_units: int = 0
    execution: ExecutionPlan | None = field(default=None, repr=False)
    handles: list[HookHandle] = field(default_factory=list, repr=False)
    prefetcher: Prefetcher | None = field(default=None, repr=False)
    schedule: Schedule | None = field(default=None, repr=False)
    sources: Sources | None = field(default=None, repr=False)  # the files the weights are mapped from

    def detach(self) -> None:
        """Remove every hook and stop the prefetch thread; the weights stay where they are."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.schedule is not None:
            if self.schedule.files is not None:  # descriptors of direct reads: not left to the garbage collector
                self.schedule.files.close()
            if self.schedule.pool is not None:
                self.schedule.pool.trim()
            # Units and schedule refer to each other, and units hold the model's tensor slots: without
            # this the model (and the checkpoint files its views keep open) would wait for the cyclic GC.
            self.schedule.units.clear()


def get_dispatch_info(model: nn.Module) -> DispatchInfo | None:
    """The :class:`DispatchInfo` of a dispatched model, or ``None``."""
    return getattr(model, _ATTR, None)


@contextmanager
def execution_tokens(model: nn.Module, tokens: int | None) -> Iterator[None]:
    """Decide ``auto`` units once for every forward inside the block, as if each had ``tokens`` tokens.

    A generation calls the model once for the prompt and once per new token. Deciding per
    forward would run a layer's prompt on the accelerator and its decoding on the CPU, away
    from its KV cache. Pinning one count for the whole generation keeps each layer on one
    device throughout; the average tokens per forward is the count that minimises the total
    under the cost model (linear in tokens for local runs, a fixed copy per forward for
    streamed ones). ``None`` counts each forward's own tokens again; nested blocks restore
    the outer count. No effect on a model that is not dispatched or has no ``auto`` units.

    >>> import torch
    >>> from torch import nn
    >>> model = cpu_offload(nn.Linear(4, 4))
    >>> with execution_tokens(model, 1):
    ...     _ = model(torch.randn(8, 4))
    ...     get_dispatch_info(model).schedule.tokens
    1
    >>> _ = model(torch.randn(8, 4)); get_dispatch_info(model).schedule.tokens
    8
    """
    info = get_dispatch_info(model)
    schedule = info.schedule if info is not None else None
    if schedule is None:
        yield
        return
    outer, schedule.pinned = schedule.pinned, tokens
    try:
        yield
    finally:
        schedule.pinned = outer


def remove_dispatch(model: nn.Module) -> nn.Module:
    """Take bigjob's hooks off ``model`` and return it as a plain module."""
    info = get_dispatch_info(model)
    if info is not None:
        info.detach()
        model.__dict__.pop(_ATTR, None)
        model.__dict__.pop("hf_device_map", None)
    return model


def dispatch_loaded(
    model: nn.Module,
    result: LoadResult,
    prefetch: int = 1,
    main_device: str | None = None,
    execution: Execution = "stream",
    execution_rates: Rates | None = None,
    disk_reads: DiskReads = "auto",
) -> nn.Module:
    """Attach hooks to a model that :func:`load_checkpoint_in_model` filled, following its placement.

    ``execution`` says how offloaded units run when the execution device is an accelerator
    (see :mod:`bigjob.engine.run.execution`): ``"stream"`` their weights there, run them
    ``"local"``-ly on the CPU, or choose per forward (``"auto"``), for all or per tier.
    ``execution_rates`` (``{"h2d": "12GB/s", "cpu_flops": ..., "device_flops": ...}``) feed
    ``auto``'s thresholds; without them they are measured once per process.

    ``disk_reads`` says how disk-tier units executed on the CPU get their bytes:
    ``"mapped"`` runs them on views of their memory-mapped files (the page cache holds the
    bytes; nothing is copied), ``"direct"`` reads them on every forward into reused buffers
    past the page cache (``O_DIRECT``), and ``"auto"`` maps them while the page cache keeps
    them and reads directly once it is seen to drop them (see :mod:`bigjob.engine.tiers.direct`).
    """
    _check_execution(execution, execution_rates, disk_reads)
    remove_dispatch(model)
    inventory = result.inventory
    assert inventory is not None
    main = normalize_device(main_device) if main_device else result.main_device
    rates = ExecutionRates.from_mapping(execution_rates) if execution_rates is not None else None
    check_devices([main, *result.placement.values()])
    main_dev = torch.device(main)
    tiers = result.placement
    if rates is None and needs_rates(execution, main):
        floating = (r.dtype for r in inventory.tensors.values() if r.dtype.is_floating_point)
        rates = measure_rates(main, inventory.target_dtype or next(floating, torch.float32))  # matmuls in the weights' dtype
    plan = plan_execution(inventory, tiers, main, execution, rates)
    modules = dict(model.named_modules(remove_duplicate=False))
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
        owned = by_unit[unit.name]
        unit_tiers = {tiers[n] for n in owned}
        module = modules[unit.name] if unit.is_module else modules[unit.name.rpartition(".")[0]]
        if not unit.is_module:
            # A direct tensor of a split module is used inside that module's own forward, around its
            # children: on an accelerator it must live on the execution device (moved there once);
            # on the CPU its home (RAM or a file view) already serves.
            if is_accelerator(main):
                for name in owned:
                    _place(modules, name, main_dev)
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
                        _place(modules, n, main_dev)  # tied tensors: brought once and kept on the device
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
            handles.append(HookHandle(module, hook))
        else:
            tied_ranges.extend(_range(modules, n) for n in offloaded if n in tied and n in file_backed)
            slots = [_slot(modules, n) for n in offloaded if n not in tied and n in file_backed]  # the order of views
            paged_unit = PagedUnit(unit.name, ranges, schedule, slots=slots)
            paged_units.append(paged_unit)
            streamed_views.extend(views)
            paged_unit.position = schedule.add(paged_unit)
            handles.append(HookHandle(module, paged_unit))
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
        _attach_direct_reads(paged_units, disk_reads, schedule)
    # Folio sizes matter to pages that are mapped; units that always read directly map none.
    checked = [] if disk_reads == "direct" else streamed_pages
    homes = (slot.home for unit in schedule.units for slot in getattr(getattr(unit, "stream", unit), "slots", ()))
    sources = Sources.of(itertools.chain(model.parameters(), model.buffers(), homes))
    handles.insert(0, HookHandle(model, RootHook(main_dev, schedule, tied_ranges, checked, sources)))
    info = DispatchInfo(
        result.device_map, main, dict(result.bytes_per_tier), result.load_seconds, result.offload_folder, result.offload_reused,
        prefetch, streamed, paged, local_units=local, auto_units=auto, execution=plan, handles=handles,
        prefetcher=prefetcher, schedule=schedule, sources=sources,
    )
    if plan.decisions and is_accelerator(main):
        log.debug("execution plan on %s:\n%s", main, plan.describe())
    object.__setattr__(model, _ATTR, info)
    object.__setattr__(model, "hf_device_map", result.device_map.to_hf())  # what Accelerate users read
    weakref.finalize(model, prefetcher.close)
    return model


def _tensor(modules: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, str, bool, torch.Tensor]:
    owner, _, local = name.rpartition(".")
    module = modules[owner]
    if local in module._parameters:
        return module, local, True, module._parameters[local]
    return module, local, False, module._buffers[local]


def _attach_direct_reads(units: list[PagedUnit], mode: DiskReads, schedule: Schedule) -> None:
    """Give each paged unit what it needs to read itself past the page cache (see :mod:`bigjob.engine.tiers.direct`).

    A unit whose file views cannot be traced to a file that is still the one mapped keeps mapping only.
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
    schedule.pool = BufferPool(max(layout.size for _, layout in layouts))
    for unit, layout in layouts:
        unit.direct = DirectReads(layout, files, schedule.pool, mode)


def _slot(modules: Mapping[str, nn.Module], name: str) -> TensorSlot:
    module, local, is_param, tensor = _tensor(modules, name)
    return TensorSlot(module, local, is_param, tensor.data if is_param else tensor)


def _range(modules: Mapping[str, nn.Module], name: str) -> Range:
    _, _, _, tensor = _tensor(modules, name)
    return Range(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def _place(modules: Mapping[str, nn.Module], name: str, device: torch.device) -> None:
    module, local, is_param, tensor = _tensor(modules, name)
    if tensor.device == device:
        return
    moved = tensor.data.to(device) if is_param else tensor.to(device)
    if is_param:
        param = nn.Parameter(moved, requires_grad=tensor.requires_grad)
        # Keep ties: every module holding this same Parameter gets the moved one.
        for other in modules.values():
            for key, value in other._parameters.items():
                if value is tensor:
                    other._parameters[key] = param
    else:
        module._buffers[local] = moved


def load_checkpoint_and_dispatch(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    device_map: str | Mapping[str, str | int] | DeviceMap | None = "auto",
    max_memory: Mapping[str | int, str | int] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    dtype: torch.dtype | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_buffers: bool = False,
    prefetch: int = 1,
    strict: bool = True,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    execution: Execution = "stream",
    execution_rates: Rates | None = None,
    disk_reads: DiskReads = "auto",
    working_memory: int | str = 0,
    *,
    strict_budget: bool = False,
) -> nn.Module:
    """Load ``checkpoint`` into the (empty) ``model`` following ``device_map`` and attach the hooks that run it.

    ``device_map`` is a strategy (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
    ``"sequential"``), a device (``"cpu"``, ``"cuda:0"``, ``"disk"``) or an explicit map.
    Outputs equal the same model loaded in RAM, wherever its weights live.
    ``working_memory``: bytes a planned map keeps free on the device that runs the model, for
    the forward itself (:func:`~bigjob.engine.plan.working_memory.estimate_working_memory` gives it
    for a batch), so that weights and forward stay within ``max_memory`` together.
    ``execution``/``execution_rates``: how offloaded units run on an accelerator (see
    :func:`dispatch_loaded`); they do not change where the weights go. A ``max_memory`` too small
    to bring offloaded units back ``1 + prefetch`` at a time lowers prefetch for them (logged at
    INFO once), then streams units larger than it anyway (warned once, with the expected peak);
    ``strict_budget=True`` raises :class:`~bigjob.errors.BudgetError` instead.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from bigjob.engine.plan.empty import init_empty_weights
    >>> from bigjob.engine.checkpoints.safetensors_writer import write_file
    >>> reference = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> path = Path(tempfile.mkdtemp()) / "model.safetensors"
    >>> write_file(path, reference.state_dict())
    >>> with init_empty_weights():
    ...     model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> model = load_checkpoint_and_dispatch(model, path, device_map={"0": "cpu", "2": "disk"}, execution="auto")
    >>> x = torch.randn(4, 8)
    >>> torch.equal(model(x), reference(x))
    True
    >>> get_dispatch_info(model).execution.choose("2", 4)  # executing on the CPU: disk-tier units run there
    'local'
    """
    _check_execution(execution, execution_rates, disk_reads)
    result = load_checkpoint_in_model(
        model,
        checkpoint,
        device_map=device_map,
        dtype=dtype,
        offload_folder=offload_folder,
        strict=strict,
        special_dtypes=special_dtypes,
        max_memory=max_memory,
        no_split_module_classes=no_split_module_classes,
        offload_buffers=offload_buffers,
        prefetch=prefetch,
        working_memory=working_memory,
        strict_budget=strict_budget,
    )
    return dispatch_loaded(model, result, prefetch=prefetch, execution=execution, execution_rates=execution_rates, disk_reads=disk_reads)


def _check_execution(execution: Execution, execution_rates: Rates | None, disk_reads: DiskReads = "auto") -> None:
    """Refuse a bad policy, bad rates or a bad ``disk_reads`` before any weight is read."""
    if disk_reads not in DISK_READS:
        raise ConfigError(f"disk_reads must be one of {', '.join(map(repr, DISK_READS))}; got {disk_reads!r}")
    resolve_policy(execution)
    if execution_rates is not None:
        ExecutionRates.from_mapping(execution_rates)


def dispatch_model(
    model: nn.Module,
    device_map: Mapping[str, str | int] | DeviceMap,
    main_device: str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    offload_buffers: bool = False,
    prefetch: int = 1,
    execution: Execution = "stream",
    execution_rates: Rates | None = None,
    disk_reads: DiskReads = "auto",
) -> nn.Module:
    """Dispatch a model whose weights are already materialised (e.g. loaded in RAM) following ``device_map``.

    Weights mapped to ``"disk"`` are written once to an offload folder under
    ``offload_folder`` (as safetensors) and served from there. ``execution`` and
    ``execution_rates`` are as for :func:`dispatch_loaded`.

    >>> import tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> x = torch.randn(2, 4); expected = model(x)
    >>> model = dispatch_model(model, {"0": "cpu", "1": "disk"}, offload_folder=tempfile.mkdtemp())
    >>> torch.equal(model(x), expected)
    True
    """
    remove_dispatch(model)
    _check_execution(execution, execution_rates, disk_reads)
    started = time.perf_counter()
    resolved = resolve_device_map(model, device_map)
    inventory = build_inventory(model)
    tiers = assign_tensors(inventory, resolved)
    main = normalize_device(main_device) if main_device else (resolved.summary.main_device if resolved.summary else CPU)
    check_devices([main, *resolved.devices])  # before any tensor moves
    modules = dict(model.named_modules(remove_duplicate=False))
    entries: list[OffloadEntry] = []
    values: dict[str, torch.Tensor] = {}
    for record in inventory.tensors.values():
        tier = tiers[record.name]
        if tier == DISK and (offload_buffers or not record.is_buffer):
            _, _, _, tensor = _tensor(modules, record.name)
            values[record.name] = tensor.detach()
            entries.append(OffloadEntry(record.name, record.name, tensor.dtype, tuple(tensor.shape)))
    offload = None
    if entries:
        if offload_folder is None:
            raise OffloadError("device_map puts weights on 'disk'; pass offload_folder to dispatch_model")
        offload = prepare_offload_folder(offload_folder, _TensorSource(values), entries)
    placement: dict[str, str] = {}
    bytes_per_tier: dict[str, int] = {}
    for record in inventory.tensors.values():
        tier = tiers[record.name]
        if record.name in values:
            first = set_tensor(modules, record.name, offload.checkpoint.view(record.name))  # type: ignore[union-attr]
            for alias in record.aliases:
                set_tensor(modules, alias, first)
        else:
            home = tier if tier != DISK else (CPU if is_accelerator(main) else main)
            _place(modules, record.name, torch.device(home))
            tier = home
        placement[record.name] = tier
        bytes_per_tier[tier] = bytes_per_tier.get(tier, 0) + record.nbytes
    result = LoadResult(resolved, main, placement, bytes_per_tier, time.perf_counter() - started, offload, set(), inventory)
    return dispatch_loaded(
        model, result, prefetch=prefetch, main_device=main, execution=execution, execution_rates=execution_rates, disk_reads=disk_reads
    )


class _TensorSource:
    """In-memory tensors as an offload source; identified by a hash of their content."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def identity(self, content_hash: bool = True) -> dict[str, str]:
        digest = hashlib.sha256()
        for name in sorted(self.tensors):
            tensor = self.tensors[name].contiguous().cpu()
            digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return {"format": "tensors", "sha256": digest.hexdigest()}

    def load(self, name: str, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.Tensor:
        tensor = self.tensors[name]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.to(device).contiguous()


def cpu_offload(
    model: nn.Module,
    execution_device: str | torch.device | None = None,
    prefetch: int = 1,
    execution: Execution = "stream",
    execution_rates: Rates | None = None,
    disk_reads: DiskReads = "auto",
) -> nn.Module:
    """Keep every weight in CPU RAM and run each module on ``execution_device``, streaming its weights
    (or, with ``execution="local"``/``"auto"``, running some modules on the CPU: see :func:`dispatch_loaded`).

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> x = torch.randn(3, 4); expected = model(x)
    >>> torch.equal(cpu_offload(model, "cpu", execution="local")(x), expected)
    True
    """
    device = normalize_device(execution_device or ("cuda:0" if torch.cuda.is_available() else CPU))
    return dispatch_model(
        model, {"": CPU}, main_device=device, prefetch=prefetch, execution=execution, execution_rates=execution_rates,
        disk_reads=disk_reads,
    )


def disk_offload(
    model: nn.Module,
    offload_folder: str | os.PathLike[str],
    execution_device: str | torch.device | None = None,
    prefetch: int = 1,
    execution: Execution = "stream",
    execution_rates: Rates | None = None,
    disk_reads: DiskReads = "auto",
    offload_buffers: bool = False,
) -> nn.Module:
    """Keep every weight (and, with ``offload_buffers``, every buffer) on disk (an offload folder) and run each module on ``execution_device``.

    With ``execution="local"`` or ``"auto"`` on an accelerator, modules may run on the CPU
    from the mapped files instead of being copied (see :func:`dispatch_loaded`).

    >>> import tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    >>> x = torch.randn(3, 4); expected = model(x)
    >>> torch.equal(disk_offload(model, tempfile.mkdtemp(), "cpu", execution="auto")(x), expected)
    True
    """
    device = normalize_device(execution_device or ("cuda:0" if torch.cuda.is_available() else CPU))
    return dispatch_model(
        model,
        {"": DISK},
        main_device=device,
        offload_folder=offload_folder,
        offload_buffers=offload_buffers,
        prefetch=prefetch,
        execution=execution,
        execution_rates=execution_rates,
        disk_reads=disk_reads,
    )
