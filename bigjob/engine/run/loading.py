"""Loading a checkpoint into a model, tensor by tensor, straight to where the device map says.

* GPU and CPU tiers: each tensor is read, converted to its target dtype (floating tensors
  only) and put on its device, one at a time: never a whole shard or state dict in RAM.
* Disk tier: when the checkpoint is safetensors and a tensor's stored dtype is its target
  dtype, the parameter becomes a zero-copy view of the checkpoint file (memory-mapped;
  nothing is copied or written). Otherwise the tensor is converted once into an offload
  folder (see :mod:`bigjob.engine.tiers.store`) and viewed from there.

Every problem with the keys is found before anything is loaded and reported at once
(:mod:`bigjob.engine.run.key_checks`).

>>> import tempfile, torch
>>> from torch import nn
>>> from bigjob.engine.plan.empty import init_empty_weights
>>> from bigjob.engine.checkpoints.safetensors_writer import write_file
>>> path = Path(tempfile.mkdtemp()) / "m.safetensors"
>>> write_file(path, nn.Linear(3, 2).state_dict())
>>> with init_empty_weights():
...     model = nn.Linear(3, 2)
>>> result = load_checkpoint_in_model(model, path)
>>> model.weight.device.type, result.bytes_per_tier
('cpu', {'cpu': 32})
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bigjob.engine.checkpoints.checkpoint import Checkpoint

from bigjob.engine.checkpoints.opening import open_checkpoint
from bigjob.engine.plan.compression import check_compression, compressed_nbytes, compressed_tensors, parts
from bigjob.engine.plan.device_map import DeviceMap, assign_tensors
from bigjob.engine.plan.devices import CPU, DISK, is_accelerator
from bigjob.engine.plan.resolution import resolve_device_map
from bigjob.engine.plan.dtypes import resolve_dtype
from bigjob.engine.plan.inventory import Inventory, TensorRecord, build_inventory
from bigjob.engine.run.compressed_units import CompressedWeights
from bigjob.engine.run.key_checks import check_keys, check_unsaved_buffers, checkpoint_dtype, stored_dtypes
from bigjob.engine.run.module_tensors import set_tensor
from bigjob.engine.tiers.pages import Range, populate
from bigjob.engine.tiers.compressed_store import part_name
from bigjob.engine.tiers.store import OffloadEntry, OffloadFolder, prepare_offload_folder
from bigjob.errors import CheckpointError, ConfigError, DeviceError, OffloadError

__all__ = ["LoadResult", "check_devices", "load_checkpoint_in_model"]


@dataclass
class LoadResult:
    """Where every tensor went, and what loading cost."""

    device_map: DeviceMap
    main_device: str
    placement: dict[str, str]  # first tensor name -> tier ("cuda:0", "cpu", "disk", ...)
    bytes_per_tier: dict[str, int]
    load_seconds: float
    offload: OffloadFolder | None = None
    # Tensors that are views of the checkpoint's own pages: disk-tier ones, and on a CPU run the
    # CPU tier too (its pages made resident at load), wherever the stored dtype is the target one.
    zero_copy: set[str] = field(default_factory=set)
    inventory: Inventory | None = field(default=None, repr=False)
    # Weights stored compressed (offload_compression): meta tensors in the model, their parts here.
    compressed: CompressedWeights = field(default_factory=CompressedWeights)

    @property
    def offload_folder(self) -> str | None:
        return str(self.offload.path) if self.offload else None

    @property
    def offload_reused(self) -> bool | None:
        return self.offload.reused if self.offload else None



def check_devices(devices: Iterable[str]) -> None:
    """Raise :class:`DeviceError` if any of ``devices`` (canonical names) does not exist on this machine.

    Called before any tensor is moved: a plan made for a declared GPU inventory fails here with a clear
    error instead of deep inside torch (``AssertionError: Torch not compiled with CUDA enabled``).
    """
    missing = []
    for device in dict.fromkeys(devices):
        if device.startswith("cuda:"):
            index = int(device.split(":")[1])
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                missing.append(device)
        elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            missing.append(device)
    if missing:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise DeviceError(
            f"the device map uses {missing}, but this machine has {have} CUDA GPU(s); "
            "plan for this machine's devices (max_memory / placement.max_memory) or run where they exist"
        )


def _module_index(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules(remove_duplicate=False))



def load_checkpoint_in_model(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Checkpoint,
    device_map: str | Mapping[str, str | int] | DeviceMap | None = None,
    dtype: torch.dtype | str | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    strict: bool = False,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    max_memory: Mapping[str | int, str | int] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
    offload_buffers: bool = False,
    prefetch: int = 1,
    working_memory: int | str = 0,
    *,
    strict_budget: bool = False,
    offload_compression: str = "none",
) -> LoadResult:
    """Load ``checkpoint`` into ``model`` (empty or not) following ``device_map`` (default: all on CPU).

    ``dtype`` is the target dtype of floating tensors (``None``: each keeps the dtype it is
    stored in); ``special_dtypes`` overrides it per module. Disk-tier tensors that need converting go
    to an offload folder under ``offload_folder`` (required then). ``prefetch`` is the depth the
    model will be dispatched with: a planned map keeps room for that many units in flight, and
    ``working_memory`` bytes free for the forward, falling back where the budget is smaller unless
    ``strict_budget`` (see :func:`~bigjob.engine.plan.resolution.infer_auto_device_map`).
    ``offload_compression`` (``"none"``, ``"int8"``, ``"int4"``) stores the ``Linear`` weights of the
    tiers that stream compressed (disk-tier ones in the offload folder, CPU-tier ones in RAM when
    an accelerator runs the model; see :mod:`bigjob.engine.plan.compression`); a planned map counts them so.
    """
    started = time.perf_counter()
    check_compression(offload_compression)
    args = (device_map, dtype, offload_folder, strict, special_dtypes, max_memory, no_split_module_classes, offload_buffers)
    args += (prefetch, working_memory, strict_budget, offload_compression)
    if isinstance(checkpoint, Checkpoint):
        return _load(model, checkpoint, started, *args)
    # Opened here, closed here: the descriptors of positioned reads must not outlive the load
    # (zero-copy views keep their own mappings alive).
    with open_checkpoint(checkpoint) as ckpt:
        return _load(model, ckpt, started, *args)


def _load(
    model: nn.Module,
    ckpt: Checkpoint,
    started: float,
    device_map: str | Mapping[str, str | int] | DeviceMap | None,
    dtype: torch.dtype | str | None,
    offload_folder: str | os.PathLike[str] | None,
    strict: bool,
    special_dtypes: Mapping[str, torch.dtype | str] | None,
    max_memory: Mapping[str | int, str | int] | None,
    no_split_module_classes: Iterable[str] | None,
    offload_buffers: bool,
    prefetch: int,
    working_memory: int | str,
    strict_budget: bool,
    compression: str,
) -> LoadResult:
    target = resolve_dtype(dtype)
    keep_stored = target is None
    if keep_stored:
        target = checkpoint_dtype(ckpt)
    inventory = build_inventory(model, target, special_dtypes, no_split_module_classes)
    report, source = check_keys(inventory, ckpt, strict)
    if keep_stored:
        # "The checkpoint's own dtype" is per tensor: a mostly-fp16 checkpoint with fp32 norms keeps them fp32.
        stored = stored_dtypes(inventory, ckpt, source, target, special_dtypes)
        if stored:
            special_dtypes = {**stored, **(special_dtypes or {})}
            inventory = build_inventory(model, target, special_dtypes, no_split_module_classes)
    resolved = resolve_device_map(
        model,
        device_map if device_map is not None else CPU,
        max_memory,
        no_split_module_classes,
        target,
        special_dtypes,
        prefetch,
        inventory=inventory,
        working_memory=working_memory,
        strict_budget=strict_budget,
        offload_compression=compression,
    )
    tiers = assign_tensors(inventory, resolved)
    main = resolved.summary.main_device if resolved.summary else _main_of(resolved)
    check_devices([main, *resolved.devices])
    modules = _module_index(model)
    check_unsaved_buffers(inventory, source, modules)

    # Disk-tier and CPU-tier tensors are views of the checkpoint's own
    # pages wherever the stored dtype is the target one: nothing is copied, and CPU-tier bytes are in
    # memory once (the page cache, mapped in bulk below) instead of twice (it and a private copy).
    # Disk-tier tensors that need converting go to an offload folder.
    offload_entries: list[OffloadEntry] = []
    zero_copy: set[str] = set()
    compress = compressed_tensors(inventory, tiers, main, compression)  # stored compressed: never a view of the checkpoint
    for record in inventory.tensors.values():
        tier = tiers[record.name]
        if record.name not in source:
            continue
        on_disk = tier == DISK and (offload_buffers or not record.is_buffer)
        # With a GPU executing, CPU-tier views are copied once more at dispatch (into pinned memory,
        # their pages released after): a private copy made here would be a third, and freed heap
        # memory that the allocator keeps counts against the CPU budget.
        if not on_disk and not (tier == CPU and not record.is_buffer):
            continue
        key = source[record.name]
        info = ckpt.info(key)
        if record.name in compress:
            if on_disk:
                offload_entries.append(OffloadEntry(record.name, key, record.dtype, tuple(record.shape), compression))
            continue
        if info is not None and info.dtype == record.dtype and info.offset % max(1, info.dtype.itemsize) == 0:
            zero_copy.add(record.name)
        elif on_disk:
            offload_entries.append(OffloadEntry(record.name, key, record.dtype, tuple(record.shape)))
    offload: OffloadFolder | None = None
    if offload_entries:
        if offload_folder is None:
            raise OffloadError(
                f"{len(offload_entries)} disk-tier tensors need converting (e.g. '{offload_entries[0].name}' "
                f"to {offload_entries[0].dtype}), which needs an offload folder; pass offload_folder "
                "(placement.offload_folder)"
            )
        offload = prepare_offload_folder(offload_folder, ckpt, offload_entries)
    offloaded = {entry.name for entry in offload_entries}

    bytes_per_tier: dict[str, int] = {}
    placement: dict[str, str] = {}
    resident: list[Range] = []
    compressed = CompressedWeights(compression)
    for record in inventory.tensors.values():
        tier = tiers[record.name]
        # Buffers of disk-tier modules stay in RAM unless offload_buffers: they are small and often used.
        # Non-persistent buffers always do: no file holds them, so a "disk" home would be an anonymous
        # copy that the dispatcher's page release (MADV_DONTNEED) would zero.
        home = tier
        if tier == DISK and record.is_buffer and (not offload_buffers or record.name not in source):
            home = main if not is_accelerator(main) else CPU
        if record.name in compress:
            value = _compressed(compressed, record, home, ckpt, source, offload, modules)
        else:
            value = _materialise(record, home, ckpt, source, offload, zero_copy, offloaded, modules)
        if home == CPU and record.name in zero_copy:
            resident.append(Range(value.data_ptr(), record.nbytes).aligned())
        for name in (record.name, *record.aliases):
            if name == record.name:
                first = set_tensor(modules, name, value)
            else:
                set_tensor(modules, name, first)
        placement[record.name] = home
        nbytes = compressed_nbytes(compression, record.shape) if record.name in compress else record.nbytes
        bytes_per_tier[home] = bytes_per_tier.get(home, 0) + nbytes
    populate(resident)  # the CPU tier is resident when loading returns, as a copied one would be
    return LoadResult(
        resolved,
        main,
        placement,
        bytes_per_tier,
        time.perf_counter() - started,
        offload,
        zero_copy,
        inventory,
        compressed,
    )


def _main_of(device_map: DeviceMap) -> str:
    for device in device_map.devices:
        if is_accelerator(device):
            return device
    return CPU


def _compressed(
    compressed: CompressedWeights,
    record: TensorRecord,
    home: str,
    ckpt: Checkpoint,
    source: Mapping[str, str],
    offload: OffloadFolder | None,
    modules: Mapping[str, nn.Module],
) -> torch.Tensor:
    """The meta tensor a compressed weight rests as; its parts are views of the offload folder (disk) or made now, in RAM."""
    if home == DISK:
        if offload is None:  # pragma: no cover - every compressed disk-tier weight is an entry of the folder
            raise ConfigError(f"internal: no offload folder for compressed '{record.name}'")
        stored = {part: offload.checkpoint.view(part_name(record.name, part)) for part in parts(compressed.scheme, record.shape)}
        return compressed.add(modules, record.name, record.dtype, record.shape, stored)
    try:
        value = ckpt.load(source[record.name], dtype=record.dtype, device=CPU)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot load tensor '{source[record.name]}' from '{ckpt.root}': {err}") from err
    return compressed.quantized(modules, record.name, value)


def _materialise(
    record: TensorRecord,
    home: str,
    ckpt: Checkpoint,
    source: Mapping[str, str],
    offload: OffloadFolder | None,
    zero_copy: set[str],
    offloaded: set[str],
    modules: Mapping[str, nn.Module],
) -> torch.Tensor:
    """The tensor for ``record`` at its home: a device tensor, or a view of a file on disk."""
    if record.name not in source:
        # A non-persistent buffer: the model's own value, moved to its device.
        owner, _, local = record.name.rpartition(".")
        current = modules[owner]._buffers.get(local)
        if current is None or current.is_meta:
            raise CheckpointError(
                f"buffer '{record.name}' is not saved in checkpoints and the model holds no value for it "
                "(built with include_buffers=True?); build the model with init_empty_weights(include_buffers=False)"
            )
        device = CPU if home == DISK else home
        return current.to(device=device, dtype=record.dtype if current.is_floating_point() else None)
    if record.name in zero_copy:
        return ckpt.view(source[record.name])
    if home == DISK:
        if offload is not None and record.name in offloaded:
            return offload.checkpoint.view(record.name)
        raise ConfigError(f"internal: no disk home for '{record.name}'")  # pragma: no cover
    try:
        return ckpt.load(source[record.name], dtype=record.dtype, device=home)
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"cannot load tensor '{source[record.name]}' from '{ckpt.root}': {err}") from err
