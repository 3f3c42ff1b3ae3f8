"""Byte counts of a model in the target dtype: per tensor slot, per module prefix, each tied tensor once.

Three linear passes over a :class:`~bigjob.engine.plan.module_tree.ModuleTree`: the bytes of
every tensor slot (:func:`count_rows`; a tied tensor has a slot under each of its names),
the later names of tensors met before (:func:`find_ties`), and the bytes under each module
prefix (:func:`accumulate`), where a tensor tied within a prefix counts once.

>>> from torch import nn
>>> from bigjob.engine.plan.dtypes import Rules
>>> from bigjob.engine.plan.module_tree import walk
>>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
>>> model[1].weight = model[0].weight
>>> tree = walk(model)
>>> rows = count_rows(tree, Rules(None, {}, None, tensor_level=False))
>>> rows.row_bytes, rows.direct
([160, 160], [0, 160, 160])
>>> first = dict(zip(reversed(rows.ids), range(len(rows.ids) - 1, -1, -1)))
>>> ties = find_ties(tree, rows.ids, first, rows.row_bytes)
>>> ties.alias_of, accumulate(tree, rows.direct, [("0.weight", "1.weight")], ties.tied_bytes)
({'1.weight': '0.weight'}, {'': 160, '0': 160, '1': 160})
"""

from __future__ import annotations

from typing import NamedTuple

from bigjob.engine.plan.dtypes import ITEMSIZE, Rules, stored_dtype
from bigjob.engine.plan.module_tree import ModuleTree

__all__ = ["Rows", "Ties", "accumulate", "count_rows", "find_ties"]


class Rows(NamedTuple):
    """One row per tensor slot in walk order (a tied tensor has a row under each name), and per-module totals."""

    ids: list[int]  # each row's ``id(tensor)``
    row_bytes: list[int]  # each row's bytes in the dtype it is loaded in
    direct: list[int]  # per walk position: bytes of the module's own tensors
    holds: list[bool]  # per walk position: whether the module has any tensor of its own


def count_rows(tree: ModuleTree, rules: Rules) -> Rows:
    """The bytes of every tensor slot of ``tree`` under ``rules``: the hot loop of planning, linear in tensors.

    Per tensor only a byte count; ties are found afterwards, all at once (:func:`find_ties`).
    """
    names = tree.names
    module_overrides = rules.module_overrides
    target = rules.target
    slow_dtype = bool(module_overrides) or rules.tensor_level
    rows = Rows([], [], [0] * len(names), [False] * len(names))
    add_id, add_bytes = rows.ids.append, rows.row_bytes.append
    direct, holds = rows.direct, rows.holds
    itemsize = ITEMSIZE
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
                stored = stored_dtype(tensor, full, module_overrides.get(name), rules)
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
    return rows


class Ties(NamedTuple):
    """The later names of tensors met before under another name (tied weights), in walk order."""

    alias_of: dict[str, str]  # alias -> first name
    aliases: dict[str, list[str]]  # first name -> its aliases
    tied_bytes: dict[str, int]  # first name -> bytes
    recount: dict[int, int]  # walk position -> bytes to add so each alias counts as its first name's bytes


def find_ties(tree: ModuleTree, ids: list[int], first: dict[int, int], row_bytes: list[int]) -> Ties:
    """Every row whose tensor has an earlier row (``first``: tensor id -> its first row), named as an alias of that first name.

    An alias counts at its first name's bytes: the two differ only when special dtypes select
    one name and not the other.
    """
    where: list[tuple[int, str]] = []  # (walk position, local name) of each row
    for index, tensors in enumerate(tree.own):
        where.extend((index, local) for local, tensor in tensors if tensor is not None)
    names = tree.names
    ties = Ties({}, {}, {}, {})
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


def accumulate(
    tree: ModuleTree,
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
