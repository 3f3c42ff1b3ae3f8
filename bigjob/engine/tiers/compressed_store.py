"""Compressed weights in offload folders: the tensors one entry is stored as, and their values.

An offload entry with a compression (``int8``, ``int4``; see :mod:`bigjob.engine.plan.compression`)
is stored as its parts, each a tensor of the folder's safetensors files named
``<weight name>.<part>`` (``layers.0.fc.weight.codes``, ``.scales``, ``.zeros``, and ``.pad``, bytes that round the
parts up to :data:`~bigjob.engine.plan.compression.PART_ALIGN`, where needed): the folder
stays a plain safetensors checkpoint that any reader can open, and its parts are viewed
(memory-mapped) like any other tensor of it. The weight itself is not stored.

>>> import torch
>>> [(name, dtype, shape) for name, dtype, shape in stored_tensors("fc.weight", torch.float16, (16, 64), "int8")]
[('fc.weight.codes', torch.int8, (16, 64)), ('fc.weight.scales', torch.float32, (16, 1))]
>>> stored_tensors("norm.weight", torch.float16, (64,), "none")
[('norm.weight', torch.float16, (64,))]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from bigjob.engine.plan.compression import PART_ALIGN, compressed_nbytes, parts, parts_nbytes
from bigjob.engine.tiers.quantize import quantize

__all__ = ["part_name", "stored_nbytes", "stored_tensors", "stored_values"]


def part_name(name: str, part: str) -> str:
    """The name part ``part`` of compressed weight ``name`` has in an offload folder.

    >>> part_name("blocks.0.qkv.weight", "scales")
    'blocks.0.qkv.weight.scales'
    """
    return f"{name}.{part}"


def stored_tensors(name: str, dtype: torch.dtype, shape: tuple[int, ...], compression: str) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(name, dtype, shape)`` of each tensor an entry is stored as: itself, or its parts when compressed."""
    if compression == "none":
        return [(name, dtype, tuple(shape))]
    found = [(part_name(name, part), part_dtype, part_shape) for part, (part_dtype, part_shape) in parts(compression, tuple(shape)).items()]
    pad = -parts_nbytes(compression, tuple(shape)) % PART_ALIGN
    return found + ([(part_name(name, "pad"), torch.uint8, (pad,))] if pad else [])


def stored_nbytes(dtype: torch.dtype, shape: tuple[int, ...], compression: str) -> int:
    """Bytes an entry takes in an offload folder (its parts, when compressed)."""
    if compression != "none":
        return compressed_nbytes(compression, tuple(shape))
    count = 1
    for dim in shape:
        count *= dim
    return count * dtype.itemsize


def stored_values(name: str, tensor: torch.Tensor, compression: str) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, value)`` of each tensor an entry is stored as, from its value ``tensor`` in the target dtype.

    >>> [(n, tuple(t.shape)) for n, t in stored_values("w", torch.ones(2, 64), "int4")]  # 64 + 8 + 2 bytes, padded to 128
    [('w.codes', (2, 32)), ('w.scales', (2, 1)), ('w.zeros', (2, 1)), ('w.pad', (54,))]
    """
    if compression == "none":
        yield name, tensor
        return
    total = 0
    for part, value in quantize(tensor, compression).items():
        total += value.numel() * value.element_size()
        yield part_name(name, part), value
    if total % PART_ALIGN:
        yield part_name(name, "pad"), torch.zeros(-total % PART_ALIGN, dtype=torch.uint8)
