"""Execution policy per offloaded unit: stream its weights to the accelerator, or run it where they live.

An *offloaded unit* is a placement unit whose weights live in CPU RAM or on disk while the
model executes on an accelerator. It can run two ways:

* ``stream``: its weights are copied to the accelerator (one pinned transfer, prefetched
  while the unit before it computes) and it runs there;
* ``local``: it runs on the CPU where its weights are; its inputs come to the CPU and its
  outputs go back to the accelerator.

``auto`` picks per forward from the batch's token count: local at or below a threshold,
stream above it. The threshold is the crossover of a cost model, computed once when the
plan is made. On a CPU execution device every offloaded (disk-tier) unit already runs where
its weights are: the policy is accepted, checked, and has no effect.

The cost model, per unit and for ``t`` tokens (all approximations, stated):

* ``flops(t) = 2 * W * t`` with ``W`` the elements of the unit's matmul-like parameters:
  parameters with two or more dimensions, except those of modules whose class name contains
  ``Embedding`` (a lookup costs no multiply-adds). Elementwise work (norms, activations,
  attention scores over the sequence) is left out; convolutions count as one matmul over
  their weight.
* ``stream(t) = max(bytes / h2d + read, flops(t) / device_flops)``: prefetching overlaps the
  copy with the compute of the unit before, so the slower of the two bounds the unit.
* ``local(t) = max(read, flops(t) / cpu_flops) + 2 * t * hidden_bytes / h2d``: the inputs go
  to the CPU and the outputs come back, each about ``hidden_bytes`` per token. The hidden
  width is the input width of the unit's first matrix (``shape[1]``: a Linear's
  ``in_features``, an Embedding's width), else the last dimension of its first tensor, in
  that tensor's element size; outputs are taken as wide as inputs (true of transformer
  blocks). Key/value caches that travel with the activations are not counted.
* ``read = bytes / disk_bytes_per_s`` for disk-tier units when a disk rate is declared, else
  0 (a warm page cache): both modes pay it.

Planning is pure (no device is touched). The rates come from :mod:`.rates` (declared, or
measured by :func:`~bigjob.engine.run.rates.measure_rates`, the one function with side effects,
kept there and re-exported here).

>>> rates = ExecutionRates(h2d_bytes_per_s=10e9, cpu_flops=1e11, device_flops=1e13)
>>> cost = UnitCost(nbytes=4_198_400, flops_per_token=2_097_152, hidden_bytes=4096)  # Linear(1024, 1024), fp32
>>> cost.crossover(rates)  # local up to 19 tokens, streaming from 20 on
19
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bigjob.engine.plan.device_map import DeviceMap, assign_tensors
from bigjob.engine.plan.devices import (
    CPU,
    DISK,
    UNLIMITED,
    format_size,
    is_accelerator,
    normalize_device,
)
from bigjob.engine.run.rates import ExecutionRates, measure_rates
from bigjob.engine.plan.inventory import Inventory
from bigjob.errors import ConfigError

__all__ = [
    "ANY",
    "POLICIES",
    "ExecutionPlan",
    "ExecutionRates",
    "UnitCost",
    "UnitDecision",
    "measure_rates",
    "needs_rates",
    "plan_execution",
    "resolve_policy",
    "unit_cost",
]

POLICIES = ("stream", "local", "auto")
TIERS = (CPU, DISK)
#: An ``auto`` threshold when local execution never gets slower than streaming: local at any batch size.
ANY = UNLIMITED


# --------------------------------------------------------------------------- cost model


class UnitCost(NamedTuple):
    """What the cost model knows of one unit: bytes that would travel, FLOPs per token, activation bytes per token."""

    nbytes: int
    flops_per_token: int
    hidden_bytes: int

    def _read(self, rates: ExecutionRates, disk: bool) -> float:
        return self.nbytes / rates.disk_bytes_per_s if disk and rates.disk_bytes_per_s else 0.0

    def stream_seconds(self, tokens: float, rates: ExecutionRates, disk: bool = False) -> float:
        """``max(bytes / h2d + read, flops(t) / device_flops)``: the copy overlaps the compute before it."""
        copy = self.nbytes / rates.h2d_bytes_per_s + self._read(rates, disk)
        return max(copy, self.flops_per_token * tokens / rates.device_flops)

    def local_seconds(self, tokens: float, rates: ExecutionRates, disk: bool = False) -> float:
        """``max(read, flops(t) / cpu_flops) + 2 * t * hidden_bytes / h2d``: compute on the CPU, activations both ways."""
        compute = max(self._read(rates, disk), self.flops_per_token * tokens / rates.cpu_flops)
        return compute + 2 * tokens * self.hidden_bytes / rates.h2d_bytes_per_s

    def crossover(self, rates: ExecutionRates, disk: bool = False) -> int:
        """The largest token count at which local is no slower than streaming, before streaming first wins.

        ``ANY`` when streaming never gets cheaper. Both costs are piecewise linear in ``t``; the
        first root of their difference is found piece by piece, then settled on integers.
        """

        def diff(t: float) -> float:
            return self.local_seconds(t, rates, disk) - self.stream_seconds(t, rates, disk)

        read = self._read(rates, disk)
        corners = {0.0}
        if self.flops_per_token > 0:  # where each max() switches operand
            corners.add(read * rates.cpu_flops / self.flops_per_token)
            corners.add((self.nbytes / rates.h2d_bytes_per_s + read) * rates.device_flops / self.flops_per_token)
        points = sorted(corners)
        root = math.inf
        for i, start in enumerate(points):
            f0 = diff(start)
            if f0 > 0:
                root = start
                break
            if i + 1 < len(points):
                f1 = diff(points[i + 1])
                if f1 > 0:
                    root = start + (-f0) * (points[i + 1] - start) / (f1 - f0)
                    break
            else:  # the last piece is linear onwards
                slope = diff(start + 1.0) - f0
                if slope > 0:
                    root = start + (-f0) / slope
        if root >= ANY:
            return ANY
        threshold = math.floor(root)
        for _ in range(4):  # float error in the root: settle on the integers around it
            if diff(threshold + 1) <= 0:
                threshold += 1
            elif threshold > 0 and diff(threshold) > 0:
                threshold -= 1
            else:
                break
        return max(threshold, 0)


def _is_lookup(owner_class: str) -> bool:
    return "Embedding" in owner_class


def unit_cost(inventory: Inventory, tensor_names: list[str]) -> UnitCost:
    """The :class:`UnitCost` of the tensors ``tensor_names`` (first names) of ``inventory``.

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import build_inventory
    >>> inv = build_inventory(nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 16)))
    >>> unit_cost(inv, ["1.weight", "1.bias"])  # 2 * 16 * 8 FLOPs per token, 8 fp32 inputs per token
    UnitCost(nbytes=576, flops_per_token=256, hidden_bytes=32)
    >>> unit_cost(inv, ["0.weight"])  # a lookup: no FLOPs
    UnitCost(nbytes=3200, flops_per_token=0, hidden_bytes=32)
    """
    records = [inventory.tensors[n] for n in tensor_names]
    nbytes = sum(r.nbytes for r in records)
    weights = 0
    for record in records:
        owner = record.name.rpartition(".")[0]
        if not record.is_buffer and len(record.shape) >= 2 and not _is_lookup(inventory.module_classes.get(owner, "")):
            weights += math.prod(record.shape)
    hidden = 0
    matrix = next((r for r in records if len(r.shape) >= 2), None)
    probe = matrix or (records[0] if records else None)
    if probe is not None:
        numel = math.prod(probe.shape)
        itemsize = probe.nbytes // numel if numel else 0
        width = probe.shape[1] if matrix is not None else (probe.shape[-1] if probe.shape else 1)
        hidden = width * itemsize
    return UnitCost(nbytes, 2 * weights, hidden)


# --------------------------------------------------------------------------- plans


def resolve_policy(execution: str | Mapping[str, str], key: str = "execution") -> dict[str, str]:
    """The policy per tier (``{"cpu": ..., "disk": ...}``) from a policy name or a per-tier mapping.

    A tier a mapping leaves out streams. ``key`` names the argument or config key in errors.

    >>> resolve_policy("auto"), resolve_policy({"disk": "local"})
    ({'cpu': 'auto', 'disk': 'auto'}, {'cpu': 'stream', 'disk': 'local'})
    >>> resolve_policy("fast")
    Traceback (most recent call last):
    ...
    bigjob.errors.ConfigError: unknown execution policy 'fast' for execution; use one of 'stream', 'local', 'auto', or a mapping per tier such as {'cpu': 'auto', 'disk': 'stream'}
    """
    allowed = "use one of 'stream', 'local', 'auto', or a mapping per tier such as {'cpu': 'auto', 'disk': 'stream'}"
    if isinstance(execution, str):
        if execution not in POLICIES:
            raise ConfigError(f"unknown execution policy {execution!r} for {key}; {allowed}")
        return dict.fromkeys(TIERS, execution)
    if not isinstance(execution, Mapping):
        raise ConfigError(f"{key}={execution!r} is neither a policy name nor a mapping per tier; {allowed}")
    unknown = [tier for tier in execution if tier not in TIERS]
    if unknown:
        raise ConfigError(f"{key} names tiers {unknown}; the offloaded tiers are 'cpu' and 'disk'")
    policy = dict.fromkeys(TIERS, "stream")
    for tier, value in execution.items():
        if value not in POLICIES:
            raise ConfigError(f"unknown execution policy {value!r} for {key}.{tier}; {allowed}")
        policy[tier] = value
    return policy


class UnitDecision(NamedTuple):
    """How one offloaded unit runs: ``policy`` is stream, local or auto (local at ``threshold`` tokens or fewer)."""

    unit: str
    tier: str  # "disk" when any of its offloaded tensors is on disk, else "cpu"
    nbytes: int
    policy: str
    threshold: int | None = None  # auto only; ANY: local at every batch size
    note: str = ""  # why the requested policy was overridden, if it was


@dataclass
class ExecutionPlan:
    """The execution decision of every offloaded unit of a dispatched model.

    >>> plan = ExecutionPlan("cuda:0", {"blocks.1": UnitDecision("blocks.1", "cpu", 4096, "auto", 8)})
    >>> plan.choose("blocks.1", 4), plan.choose("blocks.1", 16)
    ('local', 'stream')
    >>> print(plan.describe())
    unit       tier        bytes  policy  threshold
    blocks.1   cpu      4.00 KiB  auto            8
    """

    main_device: str
    decisions: dict[str, UnitDecision] = field(default_factory=dict)
    rates: ExecutionRates | None = None

    def choose(self, unit: str, tokens: int | None) -> str:
        """``"stream"`` or ``"local"`` for ``unit`` in a forward of ``tokens`` tokens (``None``: unknown, streams)."""
        try:
            decision = self.decisions[unit]
        except KeyError:
            raise KeyError(f"{unit!r} is not an offloaded unit of this plan; offloaded: {sorted(self.decisions)[:10]}") from None
        if decision.policy != "auto":
            return decision.policy
        return "local" if tokens is not None and decision.threshold is not None and tokens <= decision.threshold else "stream"

    def count(self, policy: str) -> int:
        """How many units have ``policy``."""
        return sum(1 for d in self.decisions.values() if d.policy == policy)

    def describe(self) -> str:
        """One row per offloaded unit: tier, bytes, policy and the auto threshold (tokens)."""
        width = max([len("unit"), *(len(name) for name in self.decisions)]) + 2
        notes = any(d.note for d in self.decisions.values())
        rows = [f"{'unit':<{width}} {'tier':<5} {'bytes':>11}  {'policy':<6} {'threshold':>10}" + ("  note" if notes else "")]
        for d in self.decisions.values():
            threshold = "-" if d.threshold is None else ("any" if d.threshold >= ANY else str(d.threshold))
            note = f"  {d.note}" if d.note else ""
            rows.append(f"{d.unit:<{width}} {d.tier:<5} {format_size(d.nbytes):>11}  {d.policy:<6} {threshold:>10}{note}".rstrip())
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able data; :meth:`from_dict` reads it back equal."""
        return {
            "main_device": self.main_device,
            "decisions": [d._asdict() for d in self.decisions.values()],
            "rates": self.rates.to_dict() if self.rates else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionPlan:
        decisions = [UnitDecision(**d) for d in data["decisions"]]
        rates = ExecutionRates(**data["rates"]) if data.get("rates") else None
        return cls(data["main_device"], {d.unit: d for d in decisions}, rates)


def needs_rates(execution: str | Mapping[str, str], main_device: str) -> bool:
    """Whether planning ``execution`` on ``main_device`` uses rates (an accelerator and some ``auto``)."""
    return is_accelerator(normalize_device(main_device)) and "auto" in resolve_policy(execution).values()


def plan_execution(
    inventory: Inventory,
    placement: Mapping[str, str] | DeviceMap,
    main_device: str,
    policy: str | Mapping[str, str] = "stream",
    rates: ExecutionRates | Mapping[str, Any] | None = None,
) -> ExecutionPlan:
    """Decide how each offloaded unit runs. Pure: no device is touched.

    ``placement`` is a tensor-name -> tier map (what the loader reports) or a device map.
    ``policy`` is ``"stream"``, ``"local"``, ``"auto"`` or a mapping per tier; ``rates``
    are needed when some unit is ``auto`` on an accelerator. Units holding tied tensors, or
    tensors resident on an accelerator, always stream (their weights cannot all stay on the
    CPU). On a CPU execution device every offloaded unit runs locally, whatever the policy.

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import build_inventory
    >>> inv = build_inventory(nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024)))
    >>> rates = ExecutionRates(10e9, 1e11, 1e13)
    >>> plan = plan_execution(inv, {"0": "cuda:0", "1": "cpu"}, "cuda:0", "auto", rates)
    >>> plan.decisions["1"].threshold, plan.choose("1", 16), plan.choose("1", 64)
    (19, 'local', 'stream')
    """
    main = normalize_device(main_device)
    policies = resolve_policy(policy)
    if isinstance(placement, DeviceMap) or not all(name in placement for name in inventory.tensors):
        tiers = assign_tensors(inventory, placement if isinstance(placement, DeviceMap) else DeviceMap(placement))
    else:
        tiers = dict(placement)
    on_accelerator = is_accelerator(main)
    parsed = None if rates is None else ExecutionRates.from_mapping(rates)
    tied = {name for group in inventory.tied_groups for name in group}
    by_unit = inventory.tensors_by_unit()
    decisions: dict[str, UnitDecision] = {}
    for unit in inventory.units:
        if not unit.is_module:
            continue  # a split module's direct tensor: kept on the execution device, not offloaded
        owned = by_unit.get(unit.name, [])
        offloaded = [n for n in owned if tiers[n] == DISK or (tiers[n] == CPU and on_accelerator)]
        if not offloaded:
            continue
        tier = DISK if any(tiers[n] == DISK for n in offloaded) else CPU
        travelling = [n for n in offloaded if n not in tied]
        nbytes = sum(inventory.tensors[n].nbytes for n in travelling)
        if not on_accelerator:
            decisions[unit.name] = UnitDecision(unit.name, tier, nbytes, "local")
            continue
        wanted = policies[tier]
        note = ""
        if wanted != "stream" and len(travelling) < len(owned):
            wanted, note = "stream", "tied or resident tensors"
        threshold = None
        if wanted == "auto":
            if parsed is None:
                raise ConfigError("execution='auto' on an accelerator needs execution_rates (or let dispatch measure them)")
            threshold = unit_cost(inventory, travelling).crossover(parsed, disk=tier == DISK)
        decisions[unit.name] = UnitDecision(unit.name, tier, nbytes, wanted, threshold, note)
    return ExecutionPlan(main, decisions, parsed)
