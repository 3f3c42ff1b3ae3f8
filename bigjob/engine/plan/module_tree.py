"""The module tree of a model: every module under every name it has, walked once, iteratively.

A model of 100k modules is walked in one pass that reads all the later passes need from
each module object (children, class, own tensors); the collector is paused meanwhile
(:func:`no_gc`), since the walk allocates many small objects.

>>> from torch import nn
>>> tree = walk(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
>>> tree.names, tree.parents, tree.branches, tree.classes
(['', '0', '1'], [-1, 0, 0], [True, False, False], ['Sequential', 'Linear', 'ReLU'])
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import nn

__all__ = ["ModuleTree", "no_gc", "walk"]


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


class ModuleTree(NamedTuple):
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


def walk(model: nn.Module) -> ModuleTree:
    """Modules in definition (pre-)order under every name they have; iterative and fast.

    A module registered under several names (T5's shared embedding) is walked under each,
    as ``state_dict`` does, so its tensors are found under every name (as ties); only a
    module inside its own subtree (a cycle) is skipped.
    """
    first: dict[int, str] = {}  # id(module) -> its first name
    again: dict[int, list[str]] = {}  # its further names (rare: shared modules)
    tree = ModuleTree([], [], [], [], [], [])
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
