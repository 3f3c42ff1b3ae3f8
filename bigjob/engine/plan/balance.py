"""Balanced budgets: per-GPU budgets that spread a model evenly over the GPUs, for the balanced strategies.

Each GPU's budget becomes about its share of the model plus one largest unit (so a whole
unit always fits), never more than it has; a GPU too small for an even share keeps what it
has and the others share the rest (water-filling). ``balanced_low_0`` keeps GPU 0 light.
The planner uses these budgets only while the model fits on the GPUs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from bigjob.engine.plan.devices import get_max_memory
from bigjob.engine.plan.inventory import Inventory, build_inventory

__all__ = ["balanced_budgets", "get_balanced_memory"]


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
    return balanced_budgets(inventory, budgets, low_zero)


def balanced_budgets(inventory: Inventory, budgets: Mapping[str, int], low_zero: bool) -> dict[str, int]:
    """``budgets`` with each GPU's balanced for ``inventory`` (unchanged with fewer than two GPUs with room).

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import build_inventory
    >>> inv = build_inventory(nn.Sequential(*[nn.Linear(100, 100) for _ in range(4)]))  # 4 x 40,400 bytes
    >>> balanced_budgets(inv, {"cuda:0": 10**6, "cuda:1": 10**6, "cpu": 10**6}, low_zero=True)
    {'cuda:0': 40400, 'cuda:1': 202000, 'cpu': 1000000}
    """
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
