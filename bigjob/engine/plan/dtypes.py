"""Dtypes of a plan: the dtype each tensor is loaded in, and its bytes per element.

Floating tensors take the target dtype (``dtype=``), or the override a ``special_dtypes``
key (module prefix, tensor name or glob pattern) selects for them; integer and bool tensors
keep their own.

>>> import torch
>>> rules = Rules(torch.bfloat16, {}, None, tensor_level=False)
>>> stored_dtype(torch.zeros(2), "0.weight", None, rules), stored_dtype(torch.zeros(2, dtype=torch.int64), "0.ids", None, rules)
(torch.bfloat16, torch.int64)
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import NamedTuple

import torch

from bigjob.errors import ConfigError

__all__ = ["ITEMSIZE", "Rules", "dtype_overrides", "module_dtypes", "resolve_dtype", "stored_dtype"]

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

# Bytes per element of the common dtypes; a plain dict lookup is faster than ``dtype.itemsize`` in the hot loop.
ITEMSIZE = {
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


class Rules(NamedTuple):
    """How the target dtype of a floating tensor is chosen."""

    target: torch.dtype | None
    module_overrides: dict[str, torch.dtype]
    special: Mapping[str, torch.dtype | str] | None
    tensor_level: bool


def dtype_overrides(
    names: Iterable[str], special_dtypes: Mapping[str, torch.dtype | str] | None
) -> dict[str, torch.dtype]:
    """Module or tensor names that a ``special_dtypes`` key (prefix or glob pattern) selects, with their dtype.

    >>> dtype_overrides(["0", "1.norm", "2"], {"*.norm": "float32", "2": "auto"})
    {'1.norm': torch.float32}
    """
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


def module_dtypes(names: list[str], overrides: dict[str, torch.dtype]) -> dict[str, torch.dtype]:
    """The override each module inherits from itself or its nearest overridden ancestor.

    ``names`` in definition (pre-)order, so that every parent comes before its children.

    >>> module_dtypes(["", "0", "0.norm", "1"], {"0": torch.float32})
    {'0': torch.float32, '0.norm': torch.float32}
    """
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


def stored_dtype(tensor: torch.Tensor, name: str, module_dtype: torch.dtype | None, rules: Rules) -> torch.dtype:
    """The dtype tensor ``name`` is loaded in: its own if not floating, else its override, the target or its own."""
    stored = tensor.dtype
    if not stored.is_floating_point:
        return stored
    chosen = module_dtype
    if rules.tensor_level:
        chosen = dtype_overrides([name], rules.special).get(name, chosen)
    return chosen or rules.target or stored
