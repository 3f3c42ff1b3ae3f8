"""The inventory of a model: its tensors, tied groups and placement units, with the bytes of each.

An :class:`Inventory` is built once from a (usually empty) model in one pass over its
module tree, linear in the number of tensors. It answers every question the planner
asks: the bytes of any module prefix in the target dtype, which tensors are tied, and
which *placement units* exist (leaves, no-split modules, and the direct tensors of
modules that get split). The dtype each tensor takes is :mod:`.dtypes`' rule; the byte
arithmetic is :mod:`.byte_counts`'.

Tied tensors (one tensor object under several names) count once.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
>>> model[1].weight = model[0].weight
>>> inv = build_inventory(model, dtype=torch.float16)
>>> inv.module_sizes[""], inv.tied_groups
(80, [('0.weight', '1.weight')])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from bigjob.engine.plan.byte_counts import Ties, accumulate, count_rows, find_ties
from bigjob.engine.plan.dtypes import ITEMSIZE, Rules, dtype_overrides, module_dtypes, resolve_dtype, stored_dtype
from bigjob.engine.plan.module_tree import ModuleTree, no_gc, walk

__all__ = ["Inventory", "TensorRecord", "Unit", "build_inventory", "compute_module_sizes"]


class TensorRecord(NamedTuple):
    """One tensor of the model under its first name, in the dtype it will be loaded in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    is_buffer: bool
    persistent: bool
    aliases: tuple[str, ...] = ()


class Unit(NamedTuple):
    """The smallest thing the planner places: a leaf module, a no-split module, or one direct tensor.

    ``name`` is the device-map key and a prefix of every tensor the unit covers; ``nbytes``
    counts each tensor once.
    """

    name: str
    nbytes: int
    is_module: bool


@dataclass
class Inventory:
    """Sizes of everything in a model for a target dtype, with its tied groups and placement units.

    Planning needs only unit and module sizes; the per-tensor :attr:`tensors` records are
    built on first access (a second walk), so planning a huge model stays fast.
    """

    units: list[Unit]
    module_sizes: dict[str, int]
    module_classes: dict[str, str]
    tied_groups: list[tuple[str, ...]]
    alias_of: dict[str, str]
    _model: nn.Module = field(repr=False)
    _rules: Rules = field(repr=False)
    _tensors: dict[str, TensorRecord] | None = field(default=None, repr=False)
    _by_unit: dict[str, list[str]] | None = field(default=None, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.module_sizes.get("", 0)

    @property
    def target_dtype(self) -> torch.dtype | None:
        """The dtype floating tensors are loaded in (``None``: each keeps its stored dtype)."""
        return self._rules.target

    @property
    def tensors(self) -> dict[str, TensorRecord]:
        """Every tensor under its first name (aliases listed in the record), in definition order."""
        if self._tensors is None:
            with no_gc():
                self._tensors = _records(self._model, self._rules, self.tied_groups)
        return self._tensors

    def tensor(self, name: str) -> TensorRecord:
        """The record of a tensor by any of its names."""
        return self.tensors[self.alias_of.get(name, name)]

    def unit_tensors(self, unit: Unit) -> list[str]:
        """First names of the tensors ``unit`` holds (aliases resolved, each once)."""
        return self.tensors_by_unit().get(unit.name, [])

    def tensors_by_unit(self) -> dict[str, list[str]]:
        """Each unit's tensors by first name, in one pass over every tensor name (computed once)."""
        if self._by_unit is None:
            names = {unit.name for unit in self.units}
            by_unit: dict[str, dict[str, None]] = {name: {} for name in names}
            for record in self.tensors.values():
                for name in (record.name, *record.aliases):
                    prefix = name
                    while prefix not in names and prefix:
                        prefix = prefix.rpartition(".")[0]
                    if prefix in names:
                        by_unit[prefix].setdefault(record.name, None)
            self._by_unit = {name: list(found) for name, found in by_unit.items()}
        return self._by_unit


def build_inventory(
    model: nn.Module,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    no_split_module_classes: Iterable[str] | None = None,
) -> Inventory:
    """Account for every tensor, module and placement unit of ``model`` (linear time).

    ``special_dtypes`` maps module prefixes, tensor names or glob patterns (``"*.norm"``)
    to the dtype their floating tensors keep, overriding ``dtype``.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    >>> inv = build_inventory(model, dtype="bf16", special_dtypes={"1": "float32"})
    >>> inv.module_sizes["0"], inv.module_sizes["1"], inv.tensors["1.weight"].dtype
    (144, 64, torch.float32)
    """
    with no_gc():
        return _build_inventory(model, dtype, special_dtypes, no_split_module_classes)


def _build_inventory(
    model: nn.Module,
    dtype: torch.dtype | str | None,
    special_dtypes: Mapping[str, torch.dtype | str] | None,
    no_split_module_classes: Iterable[str] | None,
) -> Inventory:
    no_split = set(no_split_module_classes or ())
    tree = walk(model)
    names = tree.names
    overrides = dtype_overrides(names, special_dtypes)
    known = set(names) if special_dtypes else set()
    rules = Rules(
        resolve_dtype(dtype),
        module_dtypes(names, overrides),
        special_dtypes,
        # Tensor-level keys (e.g. "lm_head.weight") are rare; only check tensors when some key is not a module.
        bool(special_dtypes) and any(key not in known for key in special_dtypes or {}),
    )
    ids, row_bytes, direct, holds = count_rows(tree, rules)
    # The row of each tensor's first name: a dict keeps the last value of a repeated key, so fill it backwards.
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))
    ties = find_ties(tree, ids, first, row_bytes) if len(first) < len(ids) else Ties({}, {}, {}, {})
    for index, delta in ties.recount.items():
        direct[index] += delta
    tied_groups = [(owner, *rest) for owner, rest in ties.aliases.items()]
    sizes = accumulate(tree, direct, tied_groups, ties.tied_bytes)
    units = _units(tree, no_split, sizes, first, row_bytes, holds)
    return Inventory(units, sizes, dict(zip(names, tree.classes)), tied_groups, ties.alias_of, model, rules)


def _units(
    tree: ModuleTree,
    no_split: set[str],
    sizes: dict[str, int],
    first: dict[int, int],
    row_bytes: list[int],
    holds: list[bool],
) -> list[Unit]:
    """Placement units in definition order: leaves and no-split modules whole, split modules' direct tensors alone."""
    names, branches, classes = tree.names, tree.branches, tree.classes
    units: list[Unit] = []
    append = units.append
    index = 0
    count = len(names)
    while index < count:
        name = names[index]
        if not branches[index]:  # a leaf
            if holds[index]:
                append(Unit(name, sizes[name], True))
            index += 1
            continue
        if classes[index] in no_split:
            inside = name + "."
            has_tensors = holds[index]
            index += 1
            while index < count and (not name or names[index].startswith(inside)):
                has_tensors = has_tensors or holds[index]
                index += 1
            if has_tensors:
                append(Unit(name, sizes[name], True))
            continue
        prefix = name + "." if name else ""
        for local, tensor in tree.own[index]:
            if tensor is not None:
                append(Unit(prefix + local, row_bytes[first[id(tensor)]], False))
        index += 1
    return units


def _records(model: nn.Module, rules: Rules, tied_groups: list[tuple[str, ...]]) -> dict[str, TensorRecord]:
    """Per-tensor records in definition order (the slow, complete walk)."""
    alias_names = {group[0]: tuple(group[1:]) for group in tied_groups}
    records: dict[str, TensorRecord] = {}
    seen: set[int] = set()
    overrides, target, tensor_level = rules.module_overrides, rules.target, rules.tensor_level
    tree = walk(model)
    for name, module in zip(tree.names, tree.modules):
        params, buffers = module._parameters, module._buffers
        if not params and not buffers:
            continue
        prefix = name + "." if name else ""
        module_dtype = overrides.get(name)
        non_persistent = module._non_persistent_buffers_set
        for is_buffer, tensors in ((False, params), (True, buffers)):
            for local, tensor in tensors.items():
                if tensor is None or id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                full = prefix + local
                if tensor_level:
                    stored = stored_dtype(tensor, full, module_dtype, rules)
                else:  # stored_dtype without the per-name lookup
                    stored = tensor.dtype
                    if stored.is_floating_point:
                        stored = module_dtype or target or stored
                nbytes = tensor.numel() * (ITEMSIZE.get(stored) or stored.itemsize)
                persistent = not (is_buffer and local in non_persistent)
                records[full] = TensorRecord(
                    full, tuple(tensor.shape), stored, nbytes, is_buffer, persistent, alias_names.get(full, ())
                )
    return records


def compute_module_sizes(
    model: nn.Module,
    dtype: torch.dtype | str | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
) -> dict[str, int]:
    """Bytes of every module prefix of ``model`` (``""`` is the whole model) in the target dtype.

    >>> from torch import nn
    >>> compute_module_sizes(nn.Linear(3, 2))[""]
    32
    """
    return build_inventory(model, dtype=dtype, special_dtypes=special_dtypes).module_sizes
