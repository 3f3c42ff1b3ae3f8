"""Byte accounting of a model: what each tensor, module and placement unit costs.

An :class:`Inventory` is built once from a (usually empty) model in one pass over its
module tree, linear in the number of tensors. It answers every question the planner
asks: the bytes of any module prefix in the target dtype, which tensors are tied, and
which *placement units* exist (leaves, no-split modules, and the direct tensors of
modules that get split).

Floating tensors take the target dtype (or a per-module override); integer and bool
tensors keep their own. Tied tensors (one tensor object under several names) count once.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
>>> model[1].weight = model[0].weight
>>> inv = build_inventory(model, dtype=torch.float16)
>>> inv.module_sizes[""], inv.tied_groups
(80, [('0.weight', '1.weight')])
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from bigjob.errors import ConfigError

__all__ = ["Inventory", "TensorRecord", "Unit", "build_inventory", "compute_module_sizes", "resolve_dtype"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "double": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str | None, key: str = "dtype") -> torch.dtype | None:
    """A torch floating dtype from a dtype or its name; ``None`` and ``"auto"`` mean "keep the stored dtype".

    >>> resolve_dtype("bf16"), resolve_dtype(None), resolve_dtype("torch.float16")
    (torch.bfloat16, None, torch.float16)
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ConfigError(f"{key}={dtype} is not a floating dtype; use float32, float16 or bfloat16")
        return dtype
    name = str(dtype).strip().lower().removeprefix("torch.")
    if name in ("auto", "none", "checkpoint", ""):
        return None
    if name not in _DTYPES:
        raise ConfigError(f"unknown {key} {dtype!r}; use one of float32, float16, bfloat16, float64 or 'auto'")
    return _DTYPES[name]


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: walking a model of 100k modules allocates many small
    objects, and each generation-2 collection would rescan the whole (acyclic) model graph."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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


class _Rules(NamedTuple):
    """How the target dtype of a floating tensor is chosen."""

    target: torch.dtype | None
    module_overrides: dict[str, torch.dtype]
    special: Mapping[str, torch.dtype | str] | None
    tensor_level: bool


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
    _rules: _Rules = field(repr=False)
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


def _dtype_overrides(
    names: Iterable[str], special_dtypes: Mapping[str, torch.dtype | str] | None
) -> dict[str, torch.dtype]:
    """Module or tensor names that a ``special_dtypes`` key (prefix or glob pattern) selects, with their dtype."""
    if not special_dtypes:
        return {}
    rules = [(key, resolve_dtype(value, key=f"special_dtypes[{key!r}]")) for key, value in special_dtypes.items()]
    chosen: dict[str, torch.dtype] = {}
    for name in names:
        for key, dtype in rules:
            if dtype is None:
                continue
            if name == key or fnmatch.fnmatchcase(name, key):
                chosen[name] = dtype
    return chosen


class _Tree(NamedTuple):
    """Every module under every name it has, in definition (pre-)order, as parallel lists.

    The walk reads all it needs from each module object at once (children, class, own
    tensors); later passes use these lists by walk position and hash no name until the
    result dicts are built. On a model of 100k modules, touching each module object once
    rather than once per pass is most of the saving.
    """

    names: list[str]
    modules: list[nn.Module]
    parents: list[int]  # walk position of each module's parent; -1 for the root
    branches: list[bool]  # whether ``_modules`` has any entry: the module is not a leaf
    classes: list[str]  # ``type(module).__name__``
    own: list[tuple[tuple[str, torch.Tensor | None], ...]]  # (local name, tensor): parameters, then buffers


def _walk(model: nn.Module) -> _Tree:
    """Modules in definition (pre-)order under every name they have; iterative and fast.

    A module registered under several names (T5's shared embedding) is walked under each,
    as ``state_dict`` does, so its tensors are found under every name (as ties); only a
    module inside its own subtree (a cycle) is skipped.
    """
    first: dict[int, str] = {}  # id(module) -> its first name
    again: dict[int, list[str]] = {}  # its further names (rare: shared modules)
    tree = _Tree([], [], [], [], [], [])
    add_name, add_module, add_parent, add_branch, add_class, add_own = (
        tree.names.append,
        tree.modules.append,
        tree.parents.append,
        tree.branches.append,
        tree.classes.append,
        tree.own.append,
    )
    stack: list[tuple[str, nn.Module, int]] = [("", model, -1)]
    pop, push = stack.pop, stack.append
    index = 0
    while stack:
        name, module, parent = pop()
        key = id(module)
        if key in first:
            earlier = [first[key], *again.get(key, ())]
            if any(not old or name.startswith(old + ".") for old in earlier):
                continue  # a cycle: the module is its own ancestor
            again.setdefault(key, []).append(name)
        else:
            first[key] = name
        add_name(name)
        add_module(module)
        add_parent(parent)
        add_class(type(module).__name__)
        add_own((*module._parameters.items(), *module._buffers.items()))
        children = module._modules
        add_branch(bool(children))
        if children:
            prefix = name + "." if name else ""
            for child, sub in reversed(children.items()):
                if sub is not None:
                    push((prefix + child, sub, index))
        index += 1
    return tree


def _module_dtypes(names: list[str], overrides: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
    """The override each module inherits from itself or its nearest overridden ancestor."""
    inherited: dict[str, torch.dtype] = {}
    if not overrides:
        return inherited
    for name in names:
        own = overrides.get(name)
        if own is None and name:
            own = inherited.get(name.rpartition(".")[0])
        if own is not None:
            inherited[name] = own
    return inherited


_ITEMSIZE = {
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.float64: 8,
    torch.int64: 8,
    torch.int32: 4,
    torch.int16: 2,
    torch.int8: 1,
    torch.uint8: 1,
    torch.bool: 1,
}


def _stored_dtype(tensor: torch.Tensor, name: str, module_dtype: torch.dtype | None, rules: _Rules) -> torch.dtype:
    stored = tensor.dtype
    if not stored.is_floating_point:
        return stored
    chosen = module_dtype
    if rules.tensor_level:
        chosen = _dtype_overrides([name], rules.special).get(name, chosen)
    return chosen or rules.target or stored


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
    tree = _walk(model)
    names = tree.names
    overrides = _dtype_overrides(names, special_dtypes)
    known = set(names) if special_dtypes else set()
    rules = _Rules(
        resolve_dtype(dtype),
        _module_dtypes(names, overrides),
        special_dtypes,
        # Tensor-level keys (e.g. "lm_head.weight") are rare; only check tensors when some key is not a module.
        bool(special_dtypes) and any(key not in known for key in special_dtypes or {}),
    )
    module_overrides = rules.module_overrides
    target = rules.target
    slow_dtype = bool(module_overrides) or rules.tensor_level

    # One row per tensor slot in walk order (a tied tensor has a row under each name): its id and bytes.
    ids: list[int] = []
    row_bytes: list[int] = []
    add_id, add_bytes = ids.append, row_bytes.append
    # Per walk position: bytes of the module's own tensors, and whether it has any.
    direct = [0] * len(names)
    holds = [False] * len(names)
    itemsize = _ITEMSIZE

    # The hot loop: per tensor only a byte count; ties are found afterwards, all at once.
    for index, tensors in enumerate(tree.own):
        if not tensors:
            continue
        here = 0
        for local, tensor in tensors:
            if tensor is None:
                continue
            if slow_dtype:
                name = names[index]
                full = f"{name}.{local}" if name else local
                stored = _stored_dtype(tensor, full, module_overrides.get(name), rules)
            else:
                stored = tensor.dtype
                if target is not None and stored.is_floating_point:
                    stored = target
            nbytes = tensor.numel() * (itemsize.get(stored) or stored.itemsize)
            add_id(id(tensor))
            add_bytes(nbytes)
            here += nbytes
            holds[index] = True
        direct[index] = here

    # The row of each tensor's first name: a dict keeps the last value of a repeated key, so fill it backwards.
    first = dict(zip(reversed(ids), range(len(ids) - 1, -1, -1)))
    ties = _find_ties(tree, ids, first, row_bytes) if len(first) < len(ids) else _Ties({}, {}, {}, {})
    for index, delta in ties.recount.items():
        direct[index] += delta
    tied_groups = [(owner, *rest) for owner, rest in ties.aliases.items()]
    sizes = _accumulate(tree, direct, tied_groups, ties.tied_bytes)
    units = _units(tree, no_split, sizes, first, row_bytes, holds)
    return Inventory(units, sizes, dict(zip(names, tree.classes)), tied_groups, ties.alias_of, model, rules)


class _Ties(NamedTuple):
    """The later names of tensors met before under another name (tied weights), in walk order."""

    alias_of: dict[str, str]  # alias -> first name
    aliases: dict[str, list[str]]  # first name -> its aliases
    tied_bytes: dict[str, int]  # first name -> bytes
    recount: dict[int, int]  # walk position -> bytes to add so each alias counts as its first name's bytes


def _find_ties(tree: _Tree, ids: list[int], first: dict[int, int], row_bytes: list[int]) -> _Ties:
    """Every row whose tensor has an earlier row (``first``), named as an alias of that first name.

    An alias counts at its first name's bytes: the two differ only when special dtypes select
    one name and not the other.
    """
    where: list[tuple[int, str]] = []  # (walk position, local name) of each row
    for index, tensors in enumerate(tree.own):
        where.extend((index, local) for local, tensor in tensors if tensor is not None)
    names = tree.names
    ties = _Ties({}, {}, {}, {})
    for row, key in enumerate(ids):
        owner_row = first[key]
        if owner_row == row:
            continue
        index, local = where[row]
        owner_index, owner_local = where[owner_row]
        owner = f"{names[owner_index]}.{owner_local}" if names[owner_index] else owner_local
        full = f"{names[index]}.{local}" if names[index] else local
        ties.alias_of[full] = owner
        ties.aliases.setdefault(owner, []).append(full)
        ties.tied_bytes[owner] = row_bytes[owner_row]
        ties.recount[index] = ties.recount.get(index, 0) + row_bytes[owner_row] - row_bytes[row]
    return ties


def _accumulate(
    tree: _Tree,
    direct: list[int],
    tied_groups: list[tuple[str, ...]],
    tied_bytes: dict[str, int],
) -> dict[str, int]:
    """Bytes under each module prefix, every tensor counted once per prefix."""
    totals = list(direct)
    parents = tree.parents
    for index in range(len(totals) - 1, 0, -1):  # children before parents; 0 is the root
        totals[parents[index]] += totals[index]
    sizes = dict(zip(tree.names, totals))
    # Tied tensors were added once per alias; take the extra copies back out of shared ancestors.
    for group in tied_groups:
        nbytes = tied_bytes[group[0]]
        counts: dict[str, int] = {}
        for tensor_name in group:
            prefix = tensor_name.rpartition(".")[0]
            while True:
                counts[prefix] = counts.get(prefix, 0) + 1
                if not prefix:
                    break
                prefix = prefix.rpartition(".")[0]
        for prefix, count in counts.items():
            if count > 1 and prefix in sizes:
                sizes[prefix] -= (count - 1) * nbytes
    return sizes


def _units(
    tree: _Tree,
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


def _records(model: nn.Module, rules: _Rules, tied_groups: list[tuple[str, ...]]) -> dict[str, TensorRecord]:
    """Per-tensor records in definition order (the slow, complete walk)."""
    alias_names = {group[0]: tuple(group[1:]) for group in tied_groups}
    records: dict[str, TensorRecord] = {}
    seen: set[int] = set()
    overrides, target, tensor_level = rules.module_overrides, rules.target, rules.tensor_level
    tree = _walk(model)
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
                    stored = _stored_dtype(tensor, full, module_dtype, rules)
                else:  # _stored_dtype without the per-name lookup
                    stored = tensor.dtype
                    if stored.is_floating_point:
                        stored = module_dtype or target or stored
                nbytes = tensor.numel() * (_ITEMSIZE.get(stored) or stored.itemsize)
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
