"""Offload compression, the pure part: which weights it touches, the parts they are stored as, their bytes.

``offload_compression`` is ``"none"`` (the default), ``"int8"`` or ``"int4"``. It stores the
weights of the tiers that stream (the disk tier always; CPU RAM too when the model runs on an
accelerator) group-wise quantized along their input dimension, :data:`GROUP_SIZE` values a group:

* ``int8``: symmetric; per group a float32 ``scale = max|w| / 127``; codes ``round(w / scale)``
  in ``[-127, 127]``, one byte each.
* ``int4``: asymmetric; per group a float32 ``scale = (hi - lo) / 15`` over the group's range
  widened to hold 0 (``lo = min(w, 0)``, ``hi = max(w, 0)``) and a uint8 zero point
  ``round(-lo / scale)``; codes ``round(w / scale) + zero`` in ``[0, 15]``, two a byte: byte
  ``j`` of a group holds its value ``j`` in the low nibble and value ``j + GROUP_SIZE / 2`` in
  the high one (halves, not neighbours: unpacking writes runs of 32, not every other value).

Either way a weight comes back within ``scale / 2`` of its value, element by element.
Only the ``weight`` of a module of class ``Linear`` is compressed, when it is 2-D, floating,
not tied, and its input dimension is a multiple of :data:`GROUP_SIZE`; biases, norms,
embeddings, tied heads and buffers keep the dtype they run in. Resident weights (on the device
that runs the model) are never compressed. The kernels are in :mod:`bigjob.engine.tiers.quantize`.

>>> parts("int4", (8, 128))
{'codes': (torch.uint8, (8, 64)), 'scales': (torch.float32, (8, 2)), 'zeros': (torch.uint8, (8, 2))}
>>> compressed_nbytes("int8", (8, 128)), compressed_nbytes("int4", (8, 128))  # 4096 bytes in float32; int4's 592 padded
(1088, 640)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bigjob.engine.plan.devices import CPU, DISK, is_accelerator
from bigjob.engine.plan.inventory import Inventory
from bigjob.errors import ConfigError

__all__ = [
    "COMPRESSIONS",
    "GROUP_SIZE",
    "PART_ALIGN",
    "check_compression",
    "compressed_nbytes",
    "compressed_tensors",
    "compressible_tensors",
    "parts",
    "parts_nbytes",
    "scheme_id",
    "stream_unit_bytes",
]

COMPRESSIONS = ("none", "int8", "int4")
GROUP_SIZE = 64  # values per scale, along the input dimension
# Bump when the stored parts or their rounding change: it is part of offload folders' fingerprints.
FORMAT_VERSION = 1
# A compressed weight's parts are padded to a multiple of this in offload folders (the writer's DATA_ALIGN):
# the weights after it stay on cache lines, its float32 scales on 4 bytes (a misaligned part could not be a view).
PART_ALIGN = 64
_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_compression(value: object, key: str = "offload_compression") -> str:
    """``value`` if it names a compression, else a one-line :class:`~bigjob.errors.ConfigError` naming ``key``.

    >>> check_compression("int4")
    'int4'
    >>> check_compression("int3")
    Traceback (most recent call last):
    ...
    bigjob.errors.ConfigError: offload_compression must be one of 'none', 'int8', 'int4'; got 'int3'
    """
    if not isinstance(value, str) or value not in COMPRESSIONS:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, COMPRESSIONS))}; got {value!r}")
    return value


def scheme_id(scheme: str) -> str:
    """The name a compression is recorded under in offload folders: scheme, group size and format version.

    >>> scheme_id("int8")
    'int8-g64-v1'
    """
    return f"{check_compression(scheme)}-g{GROUP_SIZE}-v{FORMAT_VERSION}"


def parts(scheme: str, shape: tuple[int, ...]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The tensors a ``(out, in)`` weight is stored as under ``scheme``: part name -> (dtype, shape)."""
    out, width = shape
    groups = width // GROUP_SIZE
    if scheme == "int8":
        return {"codes": (torch.int8, (out, width)), "scales": (torch.float32, (out, groups))}
    if scheme == "int4":
        return {"codes": (torch.uint8, (out, width // 2)), "scales": (torch.float32, (out, groups)), "zeros": (torch.uint8, (out, groups))}
    raise ConfigError(f"internal: no parts for compression {scheme!r}")  # pragma: no cover


def parts_nbytes(scheme: str, shape: tuple[int, ...]) -> int:
    """Bytes of the parts of a ``(out, in)`` weight under ``scheme``, unpadded."""
    total = 0
    for dtype, part_shape in parts(scheme, shape).values():
        count = 1
        for dim in part_shape:
            count *= dim
        total += count * dtype.itemsize
    return total


def compressed_nbytes(scheme: str, shape: tuple[int, ...]) -> int:
    """Bytes a ``(out, in)`` weight takes stored under ``scheme``: its parts, padded to :data:`PART_ALIGN`."""
    total = parts_nbytes(scheme, shape)
    return total + -total % PART_ALIGN


def compressible_tensors(inventory: Inventory) -> list[str]:
    """Names of the tensors compression may store compressed, in definition order.

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import build_inventory
    >>> model = nn.Sequential(nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 4), nn.Embedding(4, 64))
    >>> compressible_tensors(build_inventory(model))  # 8 inputs are no group of 64; norms and embeddings never
    ['0.weight']
    """
    module_units = {unit.name for unit in inventory.units if unit.is_module}
    # A direct tensor of a split module has no forward of its own to be dequantized in.
    in_module_unit = {name for unit, owned in inventory.tensors_by_unit().items() if unit in module_units for name in owned}
    classes = inventory.module_classes
    names: list[str] = []
    for name, record in inventory.tensors.items():
        owner, _, local = name.rpartition(".")
        if (
            local == "weight"
            and name in in_module_unit
            and not record.is_buffer
            and classes.get(owner) == "Linear"
            and len(record.shape) == 2
            and record.dtype in _FLOATS
            and record.shape[1] % GROUP_SIZE == 0
            and not record.aliases
        ):
            names.append(name)
    return names


def compressed_tensors(inventory: Inventory, tiers: Mapping[str, str], main: str, scheme: str) -> set[str]:
    """The tensors stored compressed for a placement: compressible ones on a tier that streams to ``main``.

    ``tiers``: tensor name -> its tier (as :func:`~bigjob.engine.plan.device_map.assign_tensors` gives).
    The disk tier always streams; CPU RAM only to an accelerator (on a CPU run it is resident).
    """
    if check_compression(scheme) == "none":
        return set()
    streaming = {DISK, CPU} if is_accelerator(main) else {DISK}
    return {name for name in compressible_tensors(inventory) if tiers.get(name) in streaming}


def stream_unit_bytes(inventory: Inventory, scheme: str) -> list[int] | None:
    """Each unit's bytes on a tier that streams, compressed weights counted compressed; ``None`` for ``"none"``.

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import build_inventory
    >>> inv = build_inventory(nn.Sequential(nn.Linear(128, 8), nn.Linear(8, 8)))
    >>> [unit.nbytes for unit in inv.units], stream_unit_bytes(inv, "int8")  # 4096 + 32 bytes of bias -> 1088 + 32
    ([4128, 288], [1120, 288])
    """
    if check_compression(scheme) == "none":
        return None
    saved: dict[str, int] = {}
    by_unit = inventory.tensors_by_unit()
    wanted = set(compressible_tensors(inventory))
    for unit, owned in by_unit.items():
        for name in owned:
            if name in wanted:
                record = inventory.tensors[name]
                saved[unit] = saved.get(unit, 0) + record.nbytes - compressed_nbytes(scheme, record.shape)
    return [unit.nbytes - saved.get(unit.name, 0) for unit in inventory.units]
