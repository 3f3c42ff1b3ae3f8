"""The device map: which device holds each module prefix, as a typed, JSON-round-tripping value.

Keys are module prefixes (``""`` is the whole model) or tensor names; a tensor goes to the
device of its longest matching key. Values are canonical device names (``"cuda:0"``,
``"mps"``, ``"cpu"``, ``"disk"``).

>>> dm = DeviceMap({"embed": "cuda:0", "blocks": "cpu", "head": "disk"})
>>> DeviceMap.from_json(dm.to_json()) == dm
True
>>> dm.device_of("blocks.3.mlp.weight")
'cpu'
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from bigjob.engine.plan.devices import UNLIMITED, device_order, format_size, normalize_device
from bigjob.engine.plan.inventory import Inventory, build_inventory
from bigjob.errors import BudgetError, DeviceMapError

__all__ = ["DeviceMap", "PlanSummary", "assign_tensors", "check_device_map"]


@dataclass(frozen=True)
class PlanSummary:
    """What the planner knew and decided: budgets, bytes placed and units per device, the reserve."""

    strategy: str
    budgets: dict[str, int]
    planned_bytes: dict[str, int]
    units: dict[str, int]
    main_device: str
    reserve: dict[str, int] = field(default_factory=dict)
    dtype: str | None = None
    total_bytes: int = 0
    working_memory: int = 0  # bytes kept free on main_device for the forward itself
    # Where a budget could not hold 1 + prefetch units in flight (see bigjob.engine.plan.budget_fallback):
    solo_units: list[str] = field(default_factory=list)  # brought back one at a time (prefetch lowered to 0)
    over_budget: dict[str, int] = field(default_factory=dict)  # unit -> bytes, streamed though larger than the budget
    streaming_peak: dict[str, int] = field(default_factory=dict)  # device -> bytes expected in flight at once


class DeviceMap(Mapping[str, str]):
    """An ordered, immutable map from module prefix to device, with the plan that produced it."""

    __slots__ = ("_entries", "summary")

    def __init__(self, entries: Mapping[str | Any, str | int], summary: PlanSummary | None = None) -> None:
        self._entries: dict[str, str] = {}
        for key, device in entries.items():
            if not isinstance(key, str):
                raise DeviceMapError(f"device map key {key!r} is not a module name; keys are module prefixes such as 'layers.0'")
            try:
                self._entries[key] = normalize_device(device, key=f"device_map[{key!r}]")
            except BudgetError as err:  # a bad device here is a bad map, not a bad budget
                raise DeviceMapError(str(err)) from None
        self.summary = summary

    @classmethod
    def _trusted(cls, entries: Mapping[str, str], summary: PlanSummary | None) -> DeviceMap:
        """Wrap entries the planner made (already canonical) without re-validating each one."""
        made = cls.__new__(cls)
        made._entries = dict(entries)
        made.summary = summary
        return made

    def __getitem__(self, key: str) -> str:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeviceMap):
            return list(self._entries.items()) == list(other._entries.items())
        if isinstance(other, Mapping):
            return dict(self._entries) == dict(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self._entries.items()))

    def __repr__(self) -> str:
        return f"DeviceMap({self._entries!r})"

    def device_of(self, name: str) -> str:
        """The device of a tensor or module by its longest matching key."""
        prefix = name
        while True:
            if prefix in self._entries:
                return self._entries[prefix]
            if not prefix:
                raise KeyError(name)
            prefix = prefix.rpartition(".")[0]

    @property
    def devices(self) -> list[str]:
        """The devices used, fastest first."""
        return sorted(set(self._entries.values()), key=device_order)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict: ``{"device_map": {...}, "plan": {...} | None}``."""
        return {"device_map": dict(self._entries), "plan": asdict(self.summary) if self.summary else None}

    def to_hf(self) -> dict[str, int | str]:
        """The map as Accelerate and Transformers write ``model.hf_device_map``: CUDA GPUs as indices.

        >>> DeviceMap({"embed": "cuda:0", "blocks.0": "cuda:1", "head": "disk"}).to_hf()
        {'embed': 0, 'blocks.0': 1, 'head': 'disk'}
        """
        return {key: int(device[5:]) if device.startswith("cuda:") else device for key, device in self._entries.items()}

    def to_json(self, indent: int | None = 2) -> str:
        """The map as JSON text; :meth:`from_json` reads it back equal."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str | Mapping[str, Any]) -> DeviceMap:
        """Read a map written by :meth:`to_json`, or a plain ``{prefix: device}`` JSON object."""
        data = json.loads(text) if isinstance(text, str) else dict(text)
        if isinstance(data, dict) and isinstance(data.get("device_map"), dict):
            plan = data.get("plan")
            return cls(data["device_map"], PlanSummary(**plan) if plan else None)
        if isinstance(data, dict):
            return cls(data)
        raise DeviceMapError(f"a device map must be a JSON object, got {type(data).__name__}")

    def describe(self, user_budgets: Mapping[str, int] | None = None) -> str:
        """The per-device table: bytes planned, the budget and its share, number of units.

        ``user_budgets`` (the budgets asked for) fill the ``budget`` column; where the planner
        capped a device below it (balanced strategies spread the model), a ``cap`` column shows
        the cap. Without them the ``budget`` column is the planner's.

        >>> print(DeviceMap({"": "cpu"}, PlanSummary("auto", {"cpu": 100}, {"cpu": 50}, {"cpu": 2}, "cpu")).describe())
        device       planned     budget   share  units
        cpu             50 B      100 B   50.0%      2
        total           50 B                         2
        >>> summary = PlanSummary("balanced", {"cpu": 80, "disk": UNLIMITED}, {"cpu": 50, "disk": 30}, {"cpu": 2, "disk": 1}, "cpu")
        >>> print(DeviceMap({"a": "cpu", "b": "disk"}, summary).describe({"cpu": 200, "disk": UNLIMITED}))
        device       planned     budget        cap   share  units
        cpu             50 B      200 B       80 B   25.0%      2
        disk            30 B  unlimited  unlimited       -      1
        total           80 B                                    3
        """
        if self.summary is None:
            counts: dict[str, int] = {}
            for device in self._entries.values():
                counts[device] = counts.get(device, 0) + 1
            rows = [f"{'device':<8} {'entries':>8}"] + [f"{d:<8} {counts[d]:>8}" for d in self.devices]
            return "\n".join(rows)
        s = self.summary
        asked = {**s.budgets, **(user_budgets or {})}
        capped = any(s.budgets.get(d, 0) != asked.get(d, 0) for d in s.budgets)
        cap_head = f" {'cap':>10}" if capped else ""
        rows = [f"{'device':<8} {'planned':>11} {'budget':>10}{cap_head} {'share':>7} {'units':>6}"]
        devices = sorted(set(s.planned_bytes) | set(s.budgets), key=device_order)
        for device in devices:
            planned = s.planned_bytes.get(device, 0)
            budget = asked.get(device, 0)
            if planned == 0 and device not in self.devices:
                continue
            share = "-" if budget >= UNLIMITED or budget == 0 else f"{100 * planned / budget:.1f}%"
            cap = f" {_size(s.budgets.get(device, 0)):>10}" if capped else ""
            rows.append(f"{device:<8} {format_size(planned):>11} {_size(budget):>10}{cap} {share:>7} {s.units.get(device, 0):>6}")
        pad = " " * 11 if capped else ""
        rows.append(f"{'total':<8} {format_size(sum(s.planned_bytes.values())):>11} {'':>10}{pad} {'':>7} {sum(s.units.values()):>6}")
        return "\n".join(rows)


def _size(n: int) -> str:
    return "unlimited" if n >= UNLIMITED else format_size(n)


def assign_tensors(inventory: Inventory, device_map: Mapping[str, str]) -> dict[str, str]:
    """The device of every tensor (under each of its names) by longest matching key; raises on gaps.

    Collects every problem before raising: tensors no key covers, keys naming nothing in the
    model, and tied tensors sent to different devices.
    """
    entries = device_map if isinstance(device_map, DeviceMap) else DeviceMap(device_map)
    known_prefixes = set(inventory.module_sizes)
    problems: list[str] = []
    unknown = [key for key in entries if key not in known_prefixes and key not in inventory.tensors and key not in inventory.alias_of]
    if unknown:
        problems.append(f"keys that name no module or tensor of the model: {_few(unknown)}")
    placed: dict[str, str] = {}
    uncovered: list[str] = []
    for record in inventory.tensors.values():
        for name in (record.name, *record.aliases):
            try:
                placed[name] = entries.device_of(name)
            except KeyError:
                uncovered.append(name)
    if uncovered:
        problems.append(f"tensors no key covers: {_few(uncovered)}")
    for group in inventory.tied_groups:
        devices = {placed[name] for name in group if name in placed}
        if len(devices) > 1:
            problems.append(f"tied tensors {list(group)} are mapped to different devices {sorted(devices)}; put them on one device")
    if problems:
        raise DeviceMapError("invalid device_map: " + "; ".join(problems))
    return placed


def check_device_map(model: nn.Module, device_map: Mapping[str, str | int]) -> None:
    """Raise :class:`DeviceMapError` if ``device_map`` leaves a tensor uncovered, names unknown modules, or splits a tie.

    >>> from torch import nn
    >>> check_device_map(nn.Sequential(nn.Linear(2, 2)), {"0": "cpu"})
    >>> check_device_map(nn.Sequential(nn.Linear(2, 2)), {"0.weight": "cpu"})
    Traceback (most recent call last):
    ...
    bigjob.errors.DeviceMapError: invalid device_map: tensors no key covers: ['0.bias']
    """
    assign_tensors(build_inventory(model), DeviceMap(device_map))


def summarize(inventory: Inventory, device_map: DeviceMap, budgets: Mapping[str, int], strategy: str, main_device: str) -> PlanSummary:
    """Bytes and units per device for a map over ``inventory`` (tied tensors counted once)."""
    planned: dict[str, int] = {}
    for record in inventory.tensors.values():
        device = device_map.device_of(record.name)
        planned[device] = planned.get(device, 0) + record.nbytes
    units: dict[str, int] = {}
    for unit in inventory.units:
        device = device_map.device_of(unit.name)
        units[device] = units.get(device, 0) + 1
    return PlanSummary(strategy, dict(budgets), planned, units, main_device, total_bytes=inventory.total_bytes)


def _few(names: list[str], limit: int = 10) -> str:
    shown = names[:limit]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return f"{shown}{more}"

