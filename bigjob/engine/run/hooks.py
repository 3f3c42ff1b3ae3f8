"""The hook protocol of a dispatched model and the hooks every dispatch has: the root and model parallel.

A hook is an object with ``pre_forward(module, args, kwargs)`` and ``post_forward(module, output)``;
:class:`HookHandle` attaches one to a module and takes it off again. The units that bring
offloaded weights in are hooks too, each kind in its own module:

* :class:`~bigjob.engine.run.paged_units.PagedUnit` - a disk-tier unit executed on the CPU,
  its file pages mapped in ahead of use and out after.
* :class:`~bigjob.engine.run.streamed_units.StreamedUnit` - a unit whose weights live in CPU
  RAM or on disk and run on an accelerator, copied in one transfer per forward.
* :mod:`bigjob.engine.run.local_units` - units run on the CPU where their weights live while
  the model executes on an accelerator (execution policies ``local`` and ``auto``).

Here are the rest: :class:`MoveInputs` moves a resident unit's tensor arguments to its device
(model parallel), and :class:`RootHook` moves the model's inputs to the execution device,
primes the prefetcher (:mod:`bigjob.engine.run.prefetcher`), and returns outputs to the device
the inputs came from. It also counts the forward's tokens (:func:`count_tokens`) on the
:class:`~bigjob.engine.run.prefetcher.Schedule`, before any prefetch, so units whose execution
depends on the batch size prepare the right way. :class:`TensorSlot` is one tensor of a unit,
which the units install and restore.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from bigjob.engine.run.prefetcher import Schedule
from bigjob.engine.tiers.folios import refresh_small_folios
from bigjob.engine.tiers.pages import Range, merge, release
from bigjob.engine.tiers.sources import Sources

__all__ = ["HookHandle", "MoveInputs", "RootHook", "TensorSlot", "count_tokens", "first_device", "move_to", "tensors_in"]

log = logging.getLogger(__name__)


def move_to(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts, dataclass-like outputs) on ``device``."""
    if isinstance(value, torch.Tensor):
        # Host-to-device copies may be asynchronous (the stream orders them before any use); a copy
        # to the CPU must not be: the caller reads the result at once, with no stream to wait on.
        return value if value.device == device else value.to(device, non_blocking=device.type != "cpu")
    if isinstance(value, (list, tuple)):
        moved = [move_to(v, device) for v in value]
        if isinstance(value, tuple) and hasattr(value, "_fields"):  # namedtuple
            return type(value)(*moved)
        return type(value)(moved)
    if isinstance(value, dict):
        out = {k: move_to(v, device) for k, v in value.items()}
        try:
            return type(value)(out)
        except TypeError:
            return out
    return value


def first_device(args: Sequence[Any], kwargs: dict[str, Any]) -> torch.device | None:
    """The device of the first tensor among the arguments, if any."""
    return next((tensor.device for tensor in tensors_in((args, kwargs))), None)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value`` (tuples, lists, dicts), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)


def count_tokens(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """The tokens of a forward: numel of the first integer tensor argument (token ids, ``(B, T)``), else
    of the first floating one divided by its last dimension (embeddings, ``(B, T, C)``); ``None`` without tensors.

    >>> count_tokens((torch.zeros(2, 1, 8),), {"ids": torch.zeros(3, 5, dtype=torch.long)})
    15
    >>> count_tokens((torch.zeros(2, 7, 8),), {}), count_tokens((), {"x": 1})
    (14, None)
    """
    first_float = None
    for tensor in tensors_in((args, kwargs)):
        if tensor.dtype == torch.bool or tensor.is_complex():
            continue
        if not tensor.is_floating_point():
            return tensor.numel()
        if first_float is None:
            first_float = tensor
    if first_float is None:
        return None
    if first_float.dim() == 0:
        return 1
    return first_float.numel() // max(first_float.shape[-1], 1)


@dataclass
class TensorSlot:
    """One tensor of a unit: where it sits in the module tree and its home (CPU or file) value."""

    module: nn.Module
    local: str
    is_param: bool
    home: torch.Tensor
    requires_grad: bool = False
    offset: int = 0  # in the unit's packed buffer

    def install(self, value: torch.Tensor) -> None:
        if self.is_param:
            self.module._parameters[self.local] = nn.Parameter(value, requires_grad=False)
        else:
            self.module._buffers[self.local] = value

    def restore(self) -> None:
        if self.is_param:
            self.module._parameters[self.local] = self._home_param
        else:
            self.module._buffers[self.local] = self.home

    def __post_init__(self) -> None:
        current = self.module._parameters.get(self.local) if self.is_param else None
        self._home_param = current if isinstance(current, nn.Parameter) else nn.Parameter(self.home, requires_grad=False)


class MoveInputs:
    """Moves a module's tensor arguments to its device (model parallel across GPUs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return move_to(args, self.device), move_to(kwargs, self.device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output


class RootHook:
    """Inputs to the execution device, prefetch primed, outputs back where the inputs were.

    Forwards of one dispatched model are serialized: threads calling ``model(x)`` at once
    take turns, each getting the output it would get alone.
    """

    def __init__(self, device: torch.device, schedule: Schedule, tied_ranges: list[Range], streamed: list[Range] | None = None,
                 sources: Sources | None = None) -> None:
        self.device = device
        self.schedule = schedule
        self.sources = sources  # files the weights are mapped from: checked for in-place changes before and after each forward
        self.tied_ranges = merge(tied_ranges)
        self._origin = threading.local()
        self._lock = threading.RLock()
        # File pages every forward maps and unmaps (tied ones included): checked once, after the
        # first forward, for small page-cache folios (see bigjob.engine.tiers.folios).
        self._unchecked = list(streamed or [])

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # One forward at a time: the units' buffers, the prefetcher and the direct-read pool are
        # the model's, not a thread's. Held until post_forward (a nested call re-enters).
        self._lock.acquire()
        stack = getattr(self._origin, "stack", None)
        if stack is None:
            stack = self._origin.stack = []
        pushed = False
        try:
            origin = first_device(args, kwargs)
            if not stack and self.sources is not None:
                self.sources.check()  # before anything reads a page of a file that may have shrunk
            root = not stack
            stack.append(origin)
            pushed = True
            pinned = self.schedule.pinned
            self.schedule.tokens = pinned if pinned is not None else count_tokens(args, kwargs)
            if root and self.schedule.reads is not None:
                self.schedule.reads.begin()  # which disk-tier units read directly this forward
            self.schedule.ahead(-1)
            return move_to(args, self.device), move_to(kwargs, self.device)
        except BaseException:
            if pushed:
                stack.pop()
                if not stack and self.schedule.reads is not None:
                    self.schedule.reads.end()
            self._lock.release()
            raise

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        stack = getattr(self._origin, "stack", None)
        if not stack:  # pre_forward raised (a changed checkpoint) and let go already: nothing ran
            return output
        try:
            return self._after(stack, output)
        finally:
            self._lock.release()

    def _after(self, stack: list, output: Any) -> Any:
        origin = stack.pop()
        self.schedule.prefetcher.settle()
        if not stack and self.schedule.reads is not None:
            self.schedule.reads.end()
        if not stack and self.schedule.slots:
            # Every unit of this forward ran (or never will: an exception). Prefetches it left
            # unused are dropped, and their device buffers with them, before the next forward.
            self.schedule.prefetcher.drain()
            for slots in self.schedule.slots.values():
                slots.reset()
        if self.tied_ranges:
            release(self.tied_ranges)
        if self._unchecked and not self._origin.stack:
            unchecked, self._unchecked = self._unchecked, []
            try:
                if refresh_small_folios(unchecked) and self.schedule.reads is not None:
                    self.schedule.reads.policy.kept = None  # those pages were dropped by us, not by a cache too small
            except Exception:  # noqa: BLE001 - a speed-up only: the forward's result is already made
                log.debug("page-cache folio check failed", exc_info=True)
        if not stack and self.sources is not None:
            self.sources.check()  # changed *during* this forward: its output may mix old and new weights
        if origin is not None and origin != self.device:
            return move_to(output, origin)
        return output


class HookHandle:
    """Attaches a hook object's ``pre_forward``/``post_forward`` to a module; ``remove()`` detaches."""

    def __init__(self, module: nn.Module, hook: Any) -> None:
        self.module = module
        self.hook = hook
        pre = module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        self._handles = [pre, module.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return self.hook.pre_forward(module, args, kwargs)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return self.hook.post_forward(module, output)

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
