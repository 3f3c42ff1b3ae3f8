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
  otherwise be refused by the kernel before it could be moved). A *buffer* made that way
  is given CPU storage again at registration, since ``include_buffers=False`` promises
  real buffers that ``__init__`` may still fill in place.

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
from collections.abc import Iterator
from dataclasses import dataclass

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


class _RedirectEmpty(TorchFunctionMode):
    """Sends ``torch.empty`` without an explicit device to ``device`` and remembers the result."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.created: dict[int, torch.Tensor] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in _UNINITIALISED_FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = self.device
            out = func(*args, **kwargs)
            self.created[id(out)] = out
            return out
        return func(*args, **kwargs)


def _move_parameter(param: nn.Parameter, device: torch.device) -> nn.Parameter:
    """The same parameter on ``device``, keeping its class, ``requires_grad`` and attributes."""
    cls = type(param)
    data = param.data.to(device)
    try:
        moved = cls(data, requires_grad=param.requires_grad)
    except TypeError:  # a Parameter subclass with its own constructor signature
        moved = nn.Parameter(data, requires_grad=param.requires_grad)
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
    if frame.redirect is not None and frame.redirect.created.get(id(buffer)) is buffer:
        # Made by the redirected torch.empty: its values were undefined anyway.
        return torch.empty_like(buffer, device="cpu")
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
