"""Facts about a model's structure that users of the big-model-inference tutorial ask for by name.

Thin, pure functions over ``named_parameters`` and :func:`~bigjob.engine.plan.inventory.compute_module_sizes`:
which parameters are one tensor under several names, and how big the largest placement unit is.

>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
>>> model[1].weight = model[0].weight
>>> find_tied_parameters(model)
[['0.weight', '1.weight']]
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from bigjob.errors import ConfigError

__all__ = ["find_tied_parameters", "get_max_layer_size"]


def find_tied_parameters(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that hold one tensor, each group sorted, the groups by their first name.

    Untied parameters are not listed, so an untied model gives ``[]``. Linear in the number
    of parameter names.

    >>> from torch import nn
    >>> layer = nn.Linear(3, 3)
    >>> find_tied_parameters(nn.Sequential(layer, layer))
    [['0.bias', '1.bias'], ['0.weight', '1.weight']]
    """
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return sorted((sorted(group) for group in names.values() if len(group) > 1), key=lambda group: group[0])


def get_max_layer_size(
    modules: Iterable[tuple[str, nn.Module]],
    module_sizes: Mapping[str, int],
    no_split_module_classes: Iterable[str] | None = None,
) -> tuple[int, list[str]]:
    """The bytes of the largest layer among ``modules`` and the names of the layers of that size.

    A layer is a module without children, or one whose class is in
    ``no_split_module_classes``; other modules are searched through. ``module_sizes`` is
    :func:`~bigjob.engine.plan.inventory.compute_module_sizes` of the model that ``modules`` come from
    (names are full prefixes, as in ``model.named_children()`` of the root).

    >>> from torch import nn
    >>> from bigjob.engine.plan.inventory import compute_module_sizes
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(8, 8)))  # 80 and 288 bytes
    >>> get_max_layer_size(list(model.named_children()), compute_module_sizes(model))
    (288, ['1.0'])
    """
    keep_whole = set(no_split_module_classes or ())
    largest, names = 0, []
    pending = list(modules)
    while pending:
        name, module = pending.pop(0)
        children = list(module.named_children())
        if children and type(module).__name__ not in keep_whole:
            prefix = f"{name}." if name else ""
            pending[:0] = [(prefix + child, sub) for child, sub in children]
            continue
        if name not in module_sizes:
            raise ConfigError(
                f"module {name!r} has no entry in module_sizes; pass compute_module_sizes(model) of the model it comes from"
            )
        size = module_sizes[name]
        if size > largest:
            largest, names = size, [name]
        elif size == largest:
            names.append(name)
    return largest, names
