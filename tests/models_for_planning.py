"""Tiny models and independent references for the planning tests.

The references here re-derive, from ``named_parameters``/``named_buffers`` and shapes, what
the engine computes with its own walk: every tensor name, the bytes of a tensor in a target
dtype, the placement units and the tied groups. Tests compare the engine against them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

# Bytes per element, written out here rather than read from torch.
ITEMSIZE = {
    torch.float64: 8,
    torch.float32: 4,
    torch.float16: 2,
    torch.bfloat16: 2,
    torch.int64: 8,
    torch.int32: 4,
    torch.int8: 1,
    torch.uint8: 1,
    torch.bool: 1,
}


def numel(shape: Sequence[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def nbytes(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``tensor`` loaded in ``dtype``: floating tensors take it, others keep their own."""
    loaded = dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
    return numel(tensor.shape) * ITEMSIZE[loaded]


def all_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor under every name it has (ties and shared modules included), buffers persistent or not."""
    found = dict(model.named_parameters(remove_duplicate=False))
    found.update(model.named_buffers(remove_duplicate=False))
    return found


def tied_groups(model: nn.Module) -> list[set[str]]:
    """Names that share one tensor object, for tensors with more than one name."""
    by_id: dict[int, set[str]] = {}
    for name, tensor in all_tensors(model).items():
        by_id.setdefault(id(tensor), set()).add(name)
    return [names for names in by_id.values() if len(names) > 1]


def unique_bytes(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    seen: dict[int, torch.Tensor] = {}
    for tensor in tensors:
        seen.setdefault(id(tensor), tensor)
    return sum(nbytes(t, dtype) for t in seen.values())


def reference_units(model: nn.Module, no_split: Iterable[str] = (), dtype: torch.dtype | None = None) -> dict[str, int]:
    """Placement units by recursion: leaves and no-split modules whole, a split module's own tensors one by one."""
    no_split = set(no_split)
    units: dict[str, int] = {}

    def visit(prefix: str, module: nn.Module, path: tuple[int, ...]) -> None:
        if id(module) in path:  # a cycle
            return
        # _modules / _parameters / _buffers directly: named_children() hides a module registered twice.
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        inside = f"{prefix}." if prefix else ""
        if not children or type(module).__name__ in no_split:
            tensors = [t for _, t in module.named_parameters(remove_duplicate=False)]
            tensors += [t for _, t in module.named_buffers(remove_duplicate=False)]
            if tensors:
                units[prefix] = unique_bytes(tensors, dtype)
            return
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None:
                units[inside + name] = nbytes(tensor, dtype)
        for name, child in children:
            visit(inside + name, child, (*path, id(module)))

    visit("", model, ())
    return units


def tensors_under(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor name at or under a module prefix or tensor name."""
    return {
        name: tensor
        for name, tensor in all_tensors(model).items()
        if not prefix or name == prefix or name.startswith(prefix + ".")
    }


# ----------------------------------------------------------------------------- tiny models


class Block(nn.Module):
    """A transformer-ish block: norm, two projections, an int position buffer and a float mask."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)
        self.register_buffer("positions", torch.arange(width))  # int64, persistent
        self.register_buffer("mask", torch.ones(width), persistent=False)  # float, not in the state dict


class TinyLM(nn.Module):
    """Embedding, blocks, a final norm and a head tied to the embedding (unless ``tie=False``)."""

    def __init__(self, vocab: int = 16, width: int = 8, depth: int = 3, tie: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie:
            self.head.weight = self.embed.weight


class Mixed(nn.Module):
    """A module with direct parameters and buffers AND children (it gets split into tensor units)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.register_buffer("steps", torch.zeros(3, dtype=torch.int32))
        self.register_buffer("table", torch.ones(width, width), persistent=False)
        self.inner = nn.Linear(width, width)


# ----------------------------------------------------------------------------- random trees


class _Custom(nn.Module):
    """A module with its own parameters and buffers and children; subclasses differ only in name."""

    def __init__(self, tensors: Sequence[tuple], children: Sequence[nn.Module]) -> None:
        super().__init__()
        for index, (kind, shape, dtype, persistent) in enumerate(tensors):
            if kind == "param":
                self.register_parameter(f"p{index}", nn.Parameter(torch.zeros(shape, dtype=dtype)))
            else:
                self.register_buffer(f"b{index}", torch.zeros(shape, dtype=dtype), persistent=persistent)
        for index, child in enumerate(children):
            self.add_module(f"c{index}", child)


class Custom0(_Custom):
    pass


class Custom1(_Custom):
    pass


class Custom2(_Custom):
    pass


class Custom3(_Custom):
    pass


CUSTOM_CLASSES = (Custom0, Custom1, Custom2, Custom3)
CLASS_NAMES = ("Custom0", "Custom1", "Custom2", "Custom3", "Linear", "LayerNorm")


def build_tree(spec: tuple) -> nn.Module:
    """An ``nn.Module`` tree from a spec drawn by :func:`tree_specs`."""
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(spec[1], spec[2], bias=spec[3])
    if kind == "norm":
        return nn.LayerNorm(spec[1])
    if kind == "embed":
        return nn.Embedding(spec[1], spec[2])
    _, cls_index, tensors, children = spec
    return CUSTOM_CLASSES[cls_index](tensors, [build_tree(child) for child in children])


def tie_and_share(model: nn.Module, ties: Sequence[tuple[int, int]], shares: Sequence[tuple[int, int]]) -> None:
    """Tie pairs of same-shaped float parameters, and register some leaves a second time elsewhere."""
    named = list(model.named_parameters())
    by_kind: dict[tuple, list[str]] = {}
    for name, param in named:
        by_kind.setdefault((tuple(param.shape), param.dtype), []).append(name)
    groups = [names for names in by_kind.values() if len(names) > 1]
    for a, b in ties:
        if not groups:
            break
        names = groups[a % len(groups)]
        source, target = names[b % len(names)], names[(b + 1) % len(names)]
        owner, _, local = target.rpartition(".")
        setattr(model.get_submodule(owner), local, model.get_parameter(source))
    modules = [(name, module) for name, module in model.named_modules() if name]
    leaves = [module for _, module in modules if not module._modules]
    hosts = [module for _, module in modules if isinstance(module, _Custom)] + [model]
    for k, (leaf_index, host_index) in enumerate(shares):
        if not leaves:
            break
        hosts[host_index % len(hosts)].add_module(f"shared{k}", leaves[leaf_index % len(leaves)])


def tree_specs():  # type: ignore[no-untyped-def]
    """A hypothesis strategy of module-tree specs: random depth and width, every kind of leaf and tensor."""
    from hypothesis import strategies as st

    dims = st.integers(1, 6)
    leaf = st.one_of(
        st.tuples(st.just("linear"), dims, dims, st.booleans()),
        st.tuples(st.just("norm"), dims),
        st.tuples(st.just("embed"), st.integers(1, 8), dims),
    )
    shape = st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple)
    param = st.tuples(st.just("param"), shape, st.sampled_from([torch.float32, torch.float16]), st.just(True))
    buffer = st.tuples(
        st.just("buffer"),
        shape,
        st.sampled_from([torch.float32, torch.int64, torch.int32, torch.bool]),
        st.booleans(),
    )
    tensors = st.lists(st.one_of(param, buffer), max_size=3)
    node = st.recursive(
        leaf,
        lambda children: st.tuples(st.just("custom"), st.integers(0, 3), tensors, st.lists(children, min_size=1, max_size=4)),
        max_leaves=14,
    )
    root = st.tuples(st.just("custom"), st.integers(0, 3), tensors, st.lists(node, min_size=1, max_size=4))
    pairs = st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=3)
    return st.tuples(root, pairs, st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=1))


def random_model(drawn: tuple) -> nn.Module:
    spec, ties, shares = drawn
    model = build_tree(spec)
    tie_and_share(model, ties, shares)
    return model
