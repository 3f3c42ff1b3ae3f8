"""The one-call entry points: load and dispatch a checkpoint, dispatch a model in RAM, offload one to CPU RAM or disk.

:func:`load_checkpoint_and_dispatch` is the one-call path of the big-model tutorial::

    with init_empty_weights():
        model = MyModel(...)
    model = load_checkpoint_and_dispatch(model, checkpoint=path, device_map="auto")

The returned model is the same object, with hooks (see :func:`~bigjob.engine.run.dispatch.dispatch_loaded`);
:func:`~bigjob.engine.run.dispatch_info.remove_dispatch` takes them off again, and
:func:`~bigjob.engine.run.dispatch_info.get_dispatch_info` says where the weights went and what loading cost.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from bigjob.engine.checkpoints.checkpoint import Checkpoint
from bigjob.engine.plan.compression import check_compression, compressed_nbytes, compressed_tensors, parts
from bigjob.engine.plan.device_map import DeviceMap, assign_tensors
from bigjob.engine.plan.devices import CPU, DISK, is_accelerator, normalize_device
from bigjob.engine.plan.resolution import resolve_device_map
from bigjob.engine.plan.inventory import build_inventory
from bigjob.engine.run.compressed_units import CompressedWeights
from bigjob.engine.run.dispatch import DiskReads, Execution, Rates, check_execution, dispatch_loaded
from bigjob.engine.run.dispatch_info import remove_dispatch
from bigjob.engine.run.loading import LoadResult, check_devices, load_checkpoint_in_model
from bigjob.engine.run.module_tensors import get_tensor, place_tensor, set_tensor
from bigjob.engine.tiers.compressed_store import part_name
from bigjob.engine.tiers.store import OffloadEntry, prepare_offload_folder
from bigjob.errors import OffloadError

__all__ = ["cpu_offload", "disk_offload", "dispatch_model", "load_checkpoint_and_dispatch"]


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
    offload_compression: str = "none",
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
    ``offload_compression`` (``"none"``, ``"int8"``, ``"int4"``): store the ``Linear`` weights of the
    tiers that stream group-wise quantized (built once into the offload folder for the disk tier)
    and dequantize each unit's right before its forward: fewer bytes to read and copy, outputs
    within the quantization error (see :mod:`bigjob.engine.plan.compression`; biases, norms and
    embeddings stay as they are).

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
    >>> from bigjob.engine.run.dispatch_info import get_dispatch_info
    >>> get_dispatch_info(model).execution.choose("2", 4)  # executing on the CPU: disk-tier units run there
    'local'
    """
    check_execution(execution, execution_rates, disk_reads)
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
        offload_compression=offload_compression,
    )
    return dispatch_loaded(model, result, prefetch=prefetch, execution=execution, execution_rates=execution_rates, disk_reads=disk_reads)


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
    *,
    offload_compression: str = "none",
) -> nn.Module:
    """Dispatch a model whose weights are already materialised (e.g. loaded in RAM) following ``device_map``.

    Weights mapped to ``"disk"`` are written once to an offload folder under
    ``offload_folder`` (as safetensors) and served from there. ``execution`` and
    ``execution_rates`` are as for :func:`dispatch_loaded`; ``offload_compression`` as for
    :func:`load_checkpoint_and_dispatch` (weights on the tiers that stream are stored compressed).

    >>> import tempfile, torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    >>> x = torch.randn(2, 4); expected = model(x)
    >>> model = dispatch_model(model, {"0": "cpu", "1": "disk"}, offload_folder=tempfile.mkdtemp())
    >>> torch.equal(model(x), expected)
    True
    """
    remove_dispatch(model)
    check_execution(execution, execution_rates, disk_reads)
    check_compression(offload_compression)
    started = time.perf_counter()
    resolved = resolve_device_map(model, device_map)
    inventory = build_inventory(model)
    tiers = assign_tensors(inventory, resolved)
    main = normalize_device(main_device) if main_device else (resolved.summary.main_device if resolved.summary else CPU)
    check_devices([main, *resolved.devices])  # before any tensor moves
    modules = dict(model.named_modules(remove_duplicate=False))
    compress = compressed_tensors(inventory, tiers, main, offload_compression)
    compressed = CompressedWeights(offload_compression)
    entries: list[OffloadEntry] = []
    values: dict[str, torch.Tensor] = {}
    for record in inventory.tensors.values():
        tier = tiers[record.name]
        if tier == DISK and (offload_buffers or not record.is_buffer):
            _, _, _, tensor = get_tensor(modules, record.name)
            values[record.name] = tensor.detach()
            scheme = offload_compression if record.name in compress else "none"
            entries.append(OffloadEntry(record.name, record.name, tensor.dtype, tuple(tensor.shape), scheme))
    offload = None
    if entries:
        if offload_folder is None:
            raise OffloadError("device_map puts weights on 'disk'; pass offload_folder to dispatch_model")
        offload = prepare_offload_folder(offload_folder, _TensorSource(values), entries)
    placement: dict[str, str] = {}
    bytes_per_tier: dict[str, int] = {}
    for record in inventory.tensors.values():
        tier = tiers[record.name]
        if record.name in compress:
            value = get_tensor(modules, record.name)[3].detach()
            if record.name in values:  # the disk tier: its parts are views of the offload folder
                stored = {part: offload.checkpoint.view(part_name(record.name, part)) for part in parts(offload_compression, record.shape)}  # type: ignore[union-attr]
                set_tensor(modules, record.name, compressed.add(modules, record.name, value.dtype, tuple(value.shape), stored))
            else:  # CPU RAM streamed to an accelerator: compressed here
                set_tensor(modules, record.name, compressed.quantized(modules, record.name, value))
        elif record.name in values:
            first = set_tensor(modules, record.name, offload.checkpoint.view(record.name))  # type: ignore[union-attr]
            for alias in record.aliases:
                set_tensor(modules, alias, first)
        else:
            home = tier if tier != DISK else (CPU if is_accelerator(main) else main)
            place_tensor(modules, record.name, torch.device(home))
            tier = home
        placement[record.name] = tier
        nbytes = compressed_nbytes(offload_compression, record.shape) if record.name in compress else record.nbytes
        bytes_per_tier[tier] = bytes_per_tier.get(tier, 0) + nbytes
    result = LoadResult(resolved, main, placement, bytes_per_tier, time.perf_counter() - started, offload, set(), inventory, compressed)
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
    *,
    offload_compression: str = "none",
) -> nn.Module:
    """Keep every weight in CPU RAM and run each module on ``execution_device``, streaming its weights
    (or, with ``execution="local"``/``"auto"``, running some modules on the CPU: see :func:`dispatch_loaded`).
    ``offload_compression`` stores the ``Linear`` weights compressed in RAM when ``execution_device``
    is an accelerator (on the CPU they are resident, and stay as they are).

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
        disk_reads=disk_reads, offload_compression=offload_compression,
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
    *,
    offload_compression: str = "none",
) -> nn.Module:
    """Keep every weight (and, with ``offload_buffers``, every buffer) on disk (an offload folder) and run each module on ``execution_device``.

    ``offload_compression`` (``"int8"``, ``"int4"``) writes the ``Linear`` weights there compressed.

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
        offload_compression=offload_compression,
    )
