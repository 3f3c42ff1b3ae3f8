"""Model skeletons that cost no memory.

Under :func:`init_empty_weights`, every parameter a module registers is moved to the
``meta`` device: it has a shape and a dtype but no storage, so a model of any size
builds in milliseconds and zero bytes.

Two mechanisms, both scoped to the calling thread:

* torch's global *registration hooks* (an official extension point), installed once and
  consulted through a thread-local stack, move every registered parameter to the target
  device, keeping its class and ``requires_grad``;
* a thread-local ``TorchFunctionMode`` sends ``torch.empty`` calls that name no device to
  the target device, so a parameter is never allocated in RAM first (a 40 GB layer would
  otherwise be refused by the kernel before it could be moved). Such a tensor gets real
  CPU storage as soon as its values are used or it is registered as a *buffer*, since
  ``include_buffers=False`` promises real buffers holding what ``__init__`` put in them.

Nothing is patched on ``nn.Module``, contexts nest, other threads are untouched, and an
exception inside the block leaves nothing behind.

>>> import torch
>>> with init_empty_weights():
...     layer = torch.nn.Linear(4096, 4096)
>>> layer.weight.device.type, tuple(layer.weight.shape)
('meta', (4096, 4096))
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module
from torch.overrides import TorchFunctionMode

__all__ = ["init_empty_weights", "init_on_device"]


@dataclass
class _Frame:
    device: torch.device
    include_buffers: bool
    redirect: _RedirectEmpty | None = None


_state = threading.local()
_install_lock = threading.Lock()
_installed = False


def _stack() -> list[_Frame]:
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    return stack


def _top() -> _Frame | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


# Factories whose result has no defined values: redirecting them loses nothing.
_UNINITIALISED_FACTORIES = frozenset({torch.empty, torch.empty_strided})
# Calls that read only a tensor's metadata: they never need its values.
_METADATA_ONLY = frozenset(
    {
        torch.Tensor.dim,
        torch.Tensor.size,
        torch.Tensor.numel,
        torch.Tensor.nelement,
        torch.Tensor.element_size,
        torch.Tensor.stride,
        torch.Tensor.is_contiguous,
        torch.Tensor.is_floating_point,
        torch.Tensor.__len__,
        torch.Tensor.__hash__,
        torch.Tensor.requires_grad_,
    }
)


def _in_place(func: Any) -> bool:
    """Whether ``func`` changes its first argument in place (``fill_``, ``nn.init.normal_``, ``t[i] = x``, ``t += x``)."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or name == "__setitem__" or name.startswith("__i")


# In-place ops that change shape or metadata, not values: never skipped.
_SHAPE_OPS = frozenset(
    {
        "resize_",
        "resize_as_",
        "set_",
        "as_strided_",
        "squeeze_",
        "unsqueeze_",
        "transpose_",
        "t_",
        "swapdims_",
        "swapaxes_",
        "requires_grad_",
        "share_memory_",
        "detach_",
        "rename_",
        "unflatten_",
    }
)


def _skippable_on_meta(func: Any, args: tuple, kwargs: dict) -> bool:
    """An in-place value op on a meta tensor whose other tensor arguments (if any) are meta too."""
    if not _in_place(func) or getattr(func, "__name__", "") in _SHAPE_OPS:
        return False
    target = args[0] if args else kwargs.get("tensor")
    if not isinstance(target, torch.Tensor) or not target.is_meta:
        return False
    others = [*args[1:], *(v for v in kwargs.values() if v is not target)]
    return all(not isinstance(v, torch.Tensor) or v.is_meta for v in others) and not any(
        isinstance(v, (list, tuple, dict)) and _holds_tensor(v) for v in others
    )


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(item) for item in value)
    if isinstance(value, dict):
        return any(_holds_tensor(item) for item in value.values())
    return False


class _RedirectEmpty(TorchFunctionMode):
    """Sends ``torch.empty`` without an explicit device to ``device``; makes such a tensor real once its values matter.

    A redirected tensor that ends up as a parameter is never given storage. In-place calls
    that only take scalars (``fill_``, ``uniform_``, ``t[i] = 0``, every ``torch.nn.init``
    function) are deferred. Any other use of its values (``copy_`` from a tensor, arithmetic,
    indexing, registration as a buffer) gives it a CPU stand-in, on which the deferred calls
    are replayed first and which every later call sees; so a buffer built from ``torch.empty``
    keeps the values ``__init__`` gave it, while initialising a parameter costs nothing.
    """

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.track = device.type != "cpu"
        self._made: dict[int, weakref.ref[torch.Tensor]] = {}  # id -> redirected tensor, while alive
        self._real: dict[int, torch.Tensor] = {}  # id -> its CPU stand-in
        self._deferred: dict[int, list[tuple[Any, tuple[Any, ...], dict[str, Any]]]] = {}  # in-place calls to replay

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if _skippable_on_meta(func, args, kwargs) and not self.is_made(args[0] if args else kwargs.get("tensor")):
            # Initialising a meta parameter (reset_parameters, nn.init) changes no data: skip it
            # rather than dispatch it, which would also import torch's Python meta kernels
            # (dynamo, sympy: ~70 MB and a second the first time).
            return None if func is torch.Tensor.__setitem__ else (args[0] if args else kwargs.get("tensor"))
        if func in _UNINITIALISED_FACTORIES and kwargs.get("device") is None:
            out = func(*args, **{**kwargs, "device": self.device})
            if self.track:
                self._remember(out)
            return out
        if self._made:
            target = args[0] if args else kwargs.get("tensor")  # nn.init passes its tensor by keyword
            if (
                self.is_made(target)
                and id(target) not in self._real
                and _in_place(func)
                and not _holds_tensor((args[1:], [v for v in kwargs.values() if v is not target]))
            ):
                self._deferred.setdefault(id(target), []).append((func, tuple(args), dict(kwargs)))
                return None if func is torch.Tensor.__setitem__ else target
            metadata = func in _METADATA_ONLY or getattr(func, "__name__", None) == "__get__"
            args = self._swap(args, metadata)
            kwargs = self._swap(kwargs, metadata)
        return func(*args, **kwargs)

    def _remember(self, tensor: torch.Tensor) -> None:
        key = id(tensor)

        def forget(_: object) -> None:
            self._made.pop(key, None)
            self._real.pop(key, None)
            self._deferred.pop(key, None)

        self._made[key] = weakref.ref(tensor, forget)

    def is_made(self, value: object) -> bool:
        """Whether ``value`` is a tensor this mode redirected (and that is still alive)."""
        if not isinstance(value, torch.Tensor):
            return False
        ref = self._made.get(id(value))
        return ref is not None and ref() is value

    def stand_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """The CPU tensor standing in for a redirected one, made (and its deferred calls replayed) on first need."""
        real = self._real.get(id(tensor))
        if real is None:
            real = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            self._real[id(tensor)] = real
            for func, args, kwargs in self._deferred.pop(id(tensor), ()):
                func(
                    *(real if arg is tensor else arg for arg in args),
                    **{key: real if arg is tensor else arg for key, arg in kwargs.items()},
                )
        return real

    def _swap(self, value: Any, metadata: bool) -> Any:
        """``value`` with redirected tensors replaced by their stand-ins (made only where values are read)."""
        if isinstance(value, torch.Tensor):
            if not self.is_made(value) or (metadata and id(value) not in self._real):
                return value
            return self.stand_in(value)
        if isinstance(value, (list, tuple)):
            swapped = [self._swap(item, metadata) for item in value]
            if all(a is b for a, b in zip(swapped, value)):
                return value
            return type(value)(*swapped) if hasattr(value, "_fields") else type(value)(swapped)
        if isinstance(value, dict):
            return {key: self._swap(item, metadata) for key, item in value.items()}
        return value


def _move_parameter(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """The same parameter on ``device``, keeping its class, ``requires_grad`` and attributes."""
    cls = type(param)
    data = param.data.to(device)
    try:
        moved = cls(data, requires_grad=param.requires_grad)
    except TypeError:  # a Parameter subclass with its own constructor signature: keep the class anyway
        moved = torch.Tensor._make_subclass(cls, data, param.requires_grad)
    moved.__dict__.update(param.__dict__)
    return moved


def _on_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
    frame = _top()
    if frame is None or param is None or param.device == frame.device:
        return None
    return _move_parameter(param, frame.device)


def _on_buffer(module: nn.Module, name: str, buffer: torch.Tensor | None) -> torch.Tensor | None:
    frame = _top()
    if frame is None or buffer is None:
        return None
    if frame.include_buffers:
        return None if buffer.device == frame.device else buffer.to(frame.device)
    if frame.redirect is not None and frame.redirect.is_made(buffer):
        # Made by the redirected torch.empty: its CPU stand-in holds whatever values __init__ gave it.
        return frame.redirect.stand_in(buffer)
    return None


def _install_hooks() -> None:
    global _installed
    with _install_lock:
        if not _installed:
            _module.register_module_parameter_registration_hook(_on_parameter)
            _module.register_module_buffer_registration_hook(_on_buffer)
            _installed = True


@contextlib.contextmanager
def init_on_device(device: torch.device | str, include_buffers: bool = False) -> Iterator[None]:
    """Create the parameters (and buffers when ``include_buffers``) of new modules on ``device``.

    Only the calling thread is affected. With ``include_buffers=True`` tensor factories
    (``torch.zeros``, ``torch.arange`` ...) also default to ``device`` inside the block, so
    buffers are never materialised elsewhere first.

    >>> with init_on_device("meta"):
    ...     norm = torch.nn.LayerNorm(8)
    >>> norm.weight.is_meta, isinstance(norm.weight, torch.nn.Parameter)
    (True, True)
    """
    target = torch.device(device)
    _install_hooks()
    stack = _stack()
    frame = _Frame(target, include_buffers)
    stack.append(frame)
    try:
        if include_buffers:
            # torch.device as a context is a thread-local TorchFunctionMode.
            with target:
                yield
        else:
            frame.redirect = _RedirectEmpty(target)
            with frame.redirect:
                yield
    finally:
        frame.redirect = None
        stack.pop()


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Build models whose parameters live on the ``meta`` device and cost no memory.

    Buffers stay real unless ``include_buffers=True`` (they are usually small, and some,
    such as position ids, are computed in ``__init__`` and not stored in checkpoints).

    >>> with init_empty_weights():
    ...     model = torch.nn.Sequential(torch.nn.Linear(100_000, 100_000), torch.nn.ReLU())
    >>> sum(p.numel() for p in model.parameters()) > 10**10, model[0].weight.is_meta
    (True, True)
    """
    with init_on_device("meta", include_buffers=include_buffers):
        yield
