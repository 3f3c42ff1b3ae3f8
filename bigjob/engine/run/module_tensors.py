"""Tensors of a module tree by their dotted names (``"blocks.0.attn.weight"``): find, set and move them.

``modules`` is the index ``dict(model.named_modules(remove_duplicate=False))``: every module
under each of its names, so tied modules are found under all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["get_tensor", "place_tensor", "set_tensor"]


def get_tensor(modules: Mapping[str, nn.Module], name: str) -> tuple[nn.Module, str, bool, torch.Tensor]:
    """The module holding tensor ``name``, its local name, whether it is a parameter, and the tensor.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.BatchNorm1d(3))
    >>> module, local, is_param, tensor = get_tensor(dict(model.named_modules()), "0.running_mean")
    >>> local, is_param, tuple(tensor.shape)
    ('running_mean', False, (3,))
    """
    owner, _, local = name.rpartition(".")
    module = modules[owner]
    if local in module._parameters:
        return module, local, True, module._parameters[local]
    return module, local, False, module._buffers[local]


def set_tensor(modules: Mapping[str, nn.Module], name: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` under tensor ``name`` (a parameter keeps its class and ``requires_grad``); return what was set."""
    owner, _, local = name.rpartition(".")
    module = modules[owner]
    if local in module._parameters:
        old = module._parameters[local]
        if isinstance(value, nn.Parameter):
            new = value
        else:
            requires_grad = bool(old is not None and old.requires_grad) and value.is_floating_point()
            cls = type(old) if old is not None else nn.Parameter
            try:
                new = cls(value, requires_grad=requires_grad)
            except TypeError:
                new = nn.Parameter(value, requires_grad=requires_grad)
        module._parameters[local] = new
        return new
    module._buffers[local] = value
    return value


def place_tensor(modules: Mapping[str, nn.Module], name: str, device: torch.device) -> None:
    """Move tensor ``name`` to ``device`` in place; a moved parameter replaces the old one in every module that holds it (ties kept).

    >>> from torch import nn
    >>> model = nn.Linear(2, 2)
    >>> place_tensor(dict(model.named_modules()), "weight", torch.device("meta")); model.weight.is_meta
    True
    """
    module, local, is_param, tensor = get_tensor(modules, name)
    if tensor.device == device:
        return
    moved = tensor.data.to(device) if is_param else tensor.to(device)
    if is_param:
        param = nn.Parameter(moved, requires_grad=tensor.requires_grad)
        # Keep ties: every module holding this same Parameter gets the moved one.
        for other in modules.values():
            for key, value in other._parameters.items():
                if value is tensor:
                    other._parameters[key] = param
    else:
        module._buffers[local] = moved
