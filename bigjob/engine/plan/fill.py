"""The fill: each placement unit onto the fastest device, at or after the one being filled, that still has room.

Units (leaves, no-split modules, direct tensors of split modules) are taken in definition
order. A device is not abandoned because one unit did not fit: smaller units after it still
go there, and the fill only moves on once nothing left could fit. Tied tensors travel
together: units holding one tensor form a :class:`Clusters` entry, placed as one at its
first unit. Linear in the number of units. How much of each budget the fill may use (the
budget less the reserve kept for streaming) is :mod:`.reserve`'s question. With offload
compression, a unit takes its compressed bytes on the devices it streams from
(:func:`stream_sizes`; see :mod:`.compression`) and its full bytes elsewhere.

>>> from torch import nn
>>> from bigjob.engine.plan.inventory import build_inventory
>>> inv = build_inventory(nn.Sequential(*[nn.Linear(10, 10) for _ in range(4)]))  # 440 bytes each
>>> fill(inv, find_clusters(inv), ["cuda:0", "cpu"], {"cuda:0": 1000, "cpu": 1000}, "max_memory")
['cuda:0', 'cuda:0', 'cpu', 'cpu']
"""

from __future__ import annotations

from itertools import accumulate
from typing import NamedTuple

from bigjob.engine.plan.devices import DISK, UNLIMITED, format_size
from bigjob.engine.plan.inventory import Inventory, Unit
from bigjob.errors import BudgetError

__all__ = ["Clusters", "fill", "find_clusters", "stream_sizes"]


class Clusters(NamedTuple):
    """Units that must share a device (tied tensors), as lists indexed by unit; an untied unit is a cluster of one.

    A cluster is named by its first unit (its head); its bytes count each tied tensor once.
    """

    head: list[int]  # each unit's cluster
    nbytes: list[int]  # each unit's cluster bytes
    members: dict[int, tuple[int, ...]]  # the units of each cluster of several, by head

    def units_of(self, head: int) -> tuple[int, ...]:
        """The units of the cluster headed by unit ``head``, in definition order."""
        return self.members.get(head, (head,))


def find_clusters(inventory: Inventory) -> Clusters:
    """Group the units that hold aliases of one tensor.

    Untied units are their own cluster; only tied tensor names are looked up, so this is
    linear in the number of units plus the (few) tied names.
    """
    units = inventory.units
    clusters = Clusters(list(range(len(units))), [unit.nbytes for unit in units], {})
    if not inventory.tied_groups:
        return clusters
    unit_index = {unit.name: i for i, unit in enumerate(units)}

    def unit_holding(tensor_name: str) -> int | None:
        prefix = tensor_name
        while True:
            if prefix in unit_index:
                return unit_index[prefix]
            if not prefix:
                return None
            prefix = prefix.rpartition(".")[0]

    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    holding: list[list[int]] = []
    for group in inventory.tied_groups:
        members = sorted({i for i in (unit_holding(name) for name in group) if i is not None})
        holding.append(members)
        for other in members[1:]:
            a, b = find(members[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for i in sorted({i for members in holding for i in members}):
        groups.setdefault(find(i), []).append(i)
    # A tied tensor held by k units of one cluster was counted k times in their sizes.
    extra: dict[int, int] = {}
    for group, members in zip(inventory.tied_groups, holding):
        if len(members) > 1:
            root = find(members[0])
            extra[root] = extra.get(root, 0) + (len(members) - 1) * inventory.tensor(group[0]).nbytes
    for root, members in groups.items():
        if len(members) == 1:
            continue
        merged = sum(units[i].nbytes for i in members) - extra.get(root, 0)
        clusters.members[members[0]] = tuple(members)
        for i in members:
            clusters.head[i] = members[0]
            clusters.nbytes[i] = merged
    return clusters


def stream_sizes(clusters: Clusters, unit_bytes: list[int], unit_stream_bytes: list[int]) -> list[int]:
    """Each unit's cluster bytes on a device it streams from, where units take ``unit_stream_bytes`` there.

    >>> stream_sizes(Clusters([0, 0, 2], [700, 700, 300], {0: (0, 1)}), [400, 400, 300], [100, 400, 80])
    [400, 400, 80]
    """
    saved = [full - streamed for full, streamed in zip(unit_bytes, unit_stream_bytes)]
    by_head: dict[int, int] = {}
    for i, head in enumerate(clusters.head):
        by_head[head] = by_head.get(head, 0) + saved[i]
    return [nbytes - by_head[head] for nbytes, head in zip(clusters.nbytes, clusters.head)]


def fill(
    inventory: Inventory,
    clusters: Clusters,
    devices: list[str],
    capacity: dict[str, int],
    key_hint: str,
    streamed: tuple[set[str], list[int]] | None = None,
) -> list[str]:
    """Device of each unit: first device at or after the current one with room; linear in units.

    ``streamed``: the devices units stream from, and each unit's cluster bytes there (:func:`stream_sizes`).
    """
    units = inventory.units
    sizes = clusters.nbytes
    streaming, on_stream = streamed if streamed is not None else (set(), sizes)
    tied = clusters.members
    room = [capacity[d] for d in devices]
    last = len(devices) - 1
    sized = [on_stream if d in streaming else sizes for d in devices]  # per device: the cluster sizes it counts
    # Smallest cluster from unit i on: once the current device cannot hold it, nothing later fits there.
    suffix_mins: dict[int, list[int]] = {}
    for table in sized:
        if id(table) not in suffix_mins:
            suffix_mins[id(table)] = list(accumulate(reversed(table), min, initial=UNLIMITED))[::-1]
    suffix = [suffix_mins[id(table)] for table in sized]
    placed: list[str | None] = [None] * len(units)
    current = 0
    for i, nbytes in enumerate(sizes):
        if placed[i] is not None:
            continue  # placed with the head of its cluster
        target = current
        while target <= last and room[target] < sized[target][i]:
            target += 1
        if target > last:
            raise _too_big(units, clusters.units_of(i), nbytes, devices, room, [capacity[d] for d in devices], key_hint)
        room[target] -= sized[target][i]
        device = devices[target]
        if i in tied:
            for member in tied[i]:
                placed[member] = device
        else:
            placed[i] = device
        while current < last and room[current] < suffix[current][i + 1]:
            current += 1
    return [device or devices[-1] for device in placed]


def _too_big(
    units: list[Unit],
    members: tuple[int, ...],
    nbytes: int,
    devices: list[str],
    room: list[int],
    capacity: list[int],
    key_hint: str,
) -> BudgetError:
    names = [units[i].name for i in members]
    what = f"module {names[0]!r}" if len(names) == 1 else f"tied modules {names}"
    disk = "" if DISK in devices else " or allow disk offload (max_memory['disk'] > 0)"
    if nbytes > max(capacity):  # no budget could ever hold it
        best = max(range(len(devices)), key=lambda j: capacity[j])
        return BudgetError(
            f"{what} needs {format_size(nbytes)} but the largest budget is "
            f"{format_size(capacity[best])} ({devices[best]}); raise {key_hint}[{devices[best]!r}]{disk}"
        )
    best = max(range(len(devices)), key=lambda j: room[j])
    return BudgetError(
        f"{what} needs {format_size(nbytes)} but the largest budget left is "
        f"{format_size(room[best])} ({devices[best]}); raise {key_hint}[{devices[best]!r}]{disk}"
    )
