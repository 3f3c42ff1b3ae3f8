"""Working memory: the bytes a forward holds beyond the weights, measured without running it.

A budget that only counts weights is overrun by the forward itself: its activations, the
outputs it returns and caches it builds (a decoder's key/value cache) live on the execution
device next to the weights. :func:`estimate_working_memory` runs the model's forward once
on fake tensors (PyTorch's ``FakeTensorMode``: every operation computes shapes and dtypes,
nothing is allocated) and follows each tensor the forward creates from its first to its
last reference. The peak of the bytes alive at once is the figure the planner can keep
free (``working_memory=`` of :func:`~bigjob.engine.plan.resolution.infer_auto_device_map`). Fake
tensors rather than ``meta`` ones, because libraries take care that their models trace
under them: on ``meta``, Transformers' value checks on the attention mask call ``.item()``.

Counted: every tensor an operation of the forward creates, while Python holds it, once per
storage (views and in-place results add nothing), and what the forward returns. Not
counted: the weights, the inputs, and what the allocator or math libraries keep beyond
live tensors (glibc arenas, BLAS scratch: tens of MiB on a CPU, a fixed cost that does
not grow with the batch). The forward is traced as a CPU forward: on a GPU, attention
kernels that never materialise the score matrix can need less. Where a model looks at
values to skip work (Transformers drops an all-ones attention mask), the trace cannot, and
counts the skipped tensors too (a boolean ``batch x tokens x tokens`` mask): the estimate
errs on the side of more room.

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256))
>>> estimate_working_memory(model, torch.zeros(8, 256))  # 8x1024 fp32 twice (Linear, ReLU) at the peak
65536
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from bigjob.errors import ConfigError

__all__ = ["ESTIMATE_VERSION", "estimate_working_memory"]

# Bump whenever a change could make the same forward give another figure: it is part of cache keys.
ESTIMATE_VERSION = "1"


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    return (leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor))


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of storages the forward's operations create, while a tensor on them lives."""

    def __init__(self, external: set[int]) -> None:
        super().__init__()
        self.external = external  # storages of weights and inputs: never counted
        self.live: dict[int, list[int]] = {}  # storage key -> [bytes, live tensors on it]
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.current -= entry[0]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {id(t) for t in _tensors((args, kwargs))}
        for tensor in _tensors(out):
            if id(tensor) in given:  # an in-place operation returns its input
                continue
            key = _storage_key(tensor)
            if key in self.external:
                continue  # a view of a weight or an input
            entry = self.live.get(key)
            if entry is None:
                nbytes = tensor.untyped_storage().nbytes()
                self.live[key] = [nbytes, 1]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            else:
                entry[1] += 1
            weakref.finalize(tensor, self._release, key)
        return out


def estimate_working_memory(model: nn.Module, *args: Any, dtype: torch.dtype | None = None, **kwargs: Any) -> int:
    """Peak bytes that ``model(*args, **kwargs)`` holds beyond its weights and inputs, returned outputs included.

    The forward runs on fake tensors under ``torch.no_grad()``: the model may be empty (built
    under :func:`~bigjob.engine.plan.empty.init_empty_weights`) or loaded, and is left as it was;
    only the inputs' shapes and dtypes matter (real or ``meta`` tensors). ``dtype``: the
    floating dtype the weights will be loaded in, when it is not the one the model was built
    with (activations follow the weights' dtype). Costs one forward's
    Python time (about 0.25 s for a 24-layer decoder) and no memory. Raises
    :class:`~bigjob.errors.ConfigError` when the forward cannot run on fake tensors (it reads
    tensor values, for example with ``.item()``).

    >>> import torch
    >>> from torch import nn
    >>> from bigjob import init_empty_weights
    >>> with init_empty_weights():
    ...     model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000))
    >>> ids = torch.zeros(4, 16, dtype=torch.long, device="meta")
    >>> estimate_working_memory(model, ids) == (4 * 16 * 64 + 4 * 16 * 1000) * 4  # embeddings, logits
    True
    """
    fake = FakeTensorMode()

    def faked(value: Any, target: torch.dtype | None = None) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        return torch.empty(value.shape, dtype=target if target and value.is_floating_point() else value.dtype)

    with fake:  # tied names are given once: functional_call ties them back
        state = {name: faked(t, dtype) for name, t in model.named_parameters()}
        state.update((name, faked(t, dtype)) for name, t in model.named_buffers())
        args, kwargs = tree_map(faked, (args, kwargs))
    external = {_storage_key(t) for t in (*state.values(), *_tensors((args, kwargs)))}
    counter = _LiveBytes(external)
    try:
        with torch.no_grad(), fake, counter:
            out = torch.func.functional_call(model, state, args, kwargs, tie_weights=True, strict=False)
    except Exception as err:  # noqa: BLE001 - any failure of the traced forward means "cannot estimate"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(
            f"the working memory of {type(model).__name__}'s forward cannot be estimated: it does not run on "
            f"fake tensors ({type(err).__name__}: {first}); give the working memory in bytes instead"
        ) from err
    del out
    return counter.peak
