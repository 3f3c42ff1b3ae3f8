"""Device maps for a model: any ``device_map`` argument resolved into a checked :class:`DeviceMap`.

:func:`infer_auto_device_map` plans a model (empty or not) under detected or given budgets
with the pure :func:`~bigjob.engine.plan.planner.plan`; :func:`resolve_device_map` plans for
a strategy name, puts the whole model on a named device, or checks a given mapping. These
are the entry points that job code calls (and tests patch): the planner itself logs nothing,
only a ``no_split_module_classes`` entry that matches no module is warned about here.

>>> from torch import nn
>>> model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])  # 4 x 263,168 bytes
>>> dm = infer_auto_device_map(model, max_memory={"cpu": 900_000})  # 2 x 263,168 kept for streaming
>>> dict(dm)
{'0': 'cpu', '1': 'disk', '2': 'disk', '3': 'disk'}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from bigjob.engine.plan.device_map import DeviceMap, assign_tensors, summarize
from bigjob.engine.plan.devices import get_max_memory, main_device, normalize_device, parse_size
from bigjob.engine.plan.inventory import Inventory, build_inventory
from bigjob.engine.plan.module_tree import no_gc
from bigjob.engine.plan.planner import STRATEGIES, plan
from bigjob.errors import BudgetError, ConfigError

__all__ = ["infer_auto_device_map", "resolve_device_map"]

log = logging.getLogger(__name__)


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
    offload_compression: str = "none",
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
    ``offload_compression`` (``"none"``, ``"int8"``, ``"int4"``): the weights on the tiers that stream
    count compressed there (see :mod:`bigjob.engine.plan.compression`).

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
        device_map = plan(
            inventory, budgets, strategy, prefetch, parse_size(working_memory, key="working_memory"), strict_budget=strict_budget,
            offload_compression=offload_compression,
        )
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
    offload_compression: str = "none",
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
            inventory=inventory, working_memory=working_memory, strict_budget=strict_budget, offload_compression=offload_compression,
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
        main = main_device({d: 1 for d in resolved.devices})
        return DeviceMap(resolved, summarize(inventory, resolved, budgets, "explicit", main))
    return resolved
