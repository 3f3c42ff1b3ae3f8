"""Hooks that run a dispatched model: inputs to the right device, offloaded weights just in time.

Three kinds of unit, chosen at dispatch from where each unit's weights live:

* :class:`MoveInputs` - a unit resident on another GPU than its inputs (model parallel):
  its tensor arguments are moved to its device.
* :class:`PagedUnit` - a disk-tier unit executed on the CPU: its parameters are zero-copy
  views of memory-mapped files. Before it runs, its pages are mapped in bulk (by the
  prefetcher, one unit ahead); after, they are unmapped so resident memory stays within
  the budget (the page cache keeps them for the next forward). Where the page cache does
  not keep them, it reads the unit into a reused buffer instead (:mod:`.direct`).
* :class:`StreamedUnit` - a unit whose weights live in CPU RAM or on disk and run on an
  accelerator: they are packed in one pinned buffer, copied in one transfer (on a side
  stream, ahead of time, by the prefetcher), swapped in for the forward and dropped after.

Units that run on the CPU where their weights live while the model executes on an
accelerator (execution policies ``local`` and ``auto``) are in :mod:`.local_units`.

A :class:`Prefetcher` (one background thread) prepares the next ``depth`` units while the
current one computes. :class:`RootHook` moves the model's inputs to the execution device,
primes the prefetcher, and returns outputs to the device the inputs came from. It also
counts the forward's tokens (:func:`count_tokens`) on the :class:`Schedule`, before any
prefetch, so units whose execution depends on the batch size prepare the right way.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigjob.engine.tiers.direct import BufferPool, DirectReads, Files
from bigjob.engine.tiers.folios import refresh_small_folios
from bigjob.engine.tiers.pages import Range, merge, populate, release, touch
from bigjob.engine.tiers.pinned import pinned_empty
from bigjob.engine.tiers.sources import Sources

__all__ = ["MoveInputs", "PagedUnit", "Prefetcher", "RootHook", "Schedule", "StreamedUnit", "TensorSlot", "count_tokens", "move_to"]

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes: every tensor in a packed buffer starts at a multiple of this


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
    return next((tensor.device for tensor in _tensors((args, kwargs))), None)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside ``value`` (tuples, lists, dicts), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def count_tokens(args: Sequence[Any], kwargs: dict[str, Any]) -> int | None:
    """The tokens of a forward: numel of the first integer tensor argument (token ids, ``(B, T)``), else
    of the first floating one divided by its last dimension (embeddings, ``(B, T, C)``); ``None`` without tensors.

    >>> count_tokens((torch.zeros(2, 1, 8),), {"ids": torch.zeros(3, 5, dtype=torch.long)})
    15
    >>> count_tokens((torch.zeros(2, 7, 8),), {}), count_tokens((), {"x": 1})
    (14, None)
    """
    first_float = None
    for tensor in _tensors((args, kwargs)):
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


class Prefetcher:
    """One background thread preparing upcoming units; ``depth`` units ahead of the current one."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bigjob-prefetch") if depth > 0 else None
        self._pending: dict[int, Future[Any]] = {}
        self._later: list[Future[Any]] = []
        self._lock = threading.Lock()

    def submit(self, key: int, task: Callable[[], Any], inline: bool = False) -> None:
        """Prepare ``key`` ahead with ``task``: on the prefetch thread, or at once on this one when ``inline``.

        ``inline`` is for tasks that only queue work on a device (a pinned unit's copy): the
        caller's thread queues it in microseconds, where a hand-off to the prefetch thread
        could wait a whole GIL switch interval (5 ms) behind a forward running Python.
        """
        if self._pool is None:
            return
        with self._lock:
            if key in self._pending:
                return
            if not inline:
                self._pending[key] = self._pool.submit(task)
                return
        future: Future[Any] = Future()
        try:
            future.set_result(task())
        except BaseException as err:  # noqa: BLE001 - raised again by take(), as from the thread
            future.set_exception(err)
        with self._lock:
            self._pending[key] = future

    def take(self, key: int) -> Any:
        """The result of the prefetch for ``key`` (waiting for it), or ``None`` if there was none."""
        with self._lock:
            future = self._pending.pop(key, None)
        return None if future is None else future.result()

    def later(self, task: Callable[[], Any]) -> None:
        """Run ``task`` on the prefetch thread after what is already queued (now, without one)."""
        if self._pool is None:
            task()
            return
        with self._lock:
            self._later.append(self._pool.submit(task))

    def settle(self) -> None:
        """Wait for the tasks given to :meth:`later`."""
        with self._lock:
            later, self._later = self._later, []
        for future in later:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a failed page release only leaves pages mapped
                log.debug("deferred task failed", exc_info=True)

    def drain(self) -> None:
        self.settle()
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        for future in pending:
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a failed prefetch is redone synchronously when needed
                log.debug("prefetch failed", exc_info=True)

    def close(self) -> None:
        self.drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pool = None


class Schedule:
    """The offloaded units in execution order, so each can ask for the next ones to be prefetched."""

    def __init__(self, prefetcher: Prefetcher) -> None:
        self.prefetcher = prefetcher
        self.units: list[Any] = []
        self.tokens: int | None = None  # of the current root forward; set before its first prefetch
        self.pinned: int | None = None  # set by dispatch.execution_tokens: the count every forward uses
        self.readahead = True  # announce a unit's pages before mapping them; off once they asked for huge folios
        self.pool: BufferPool | None = None  # read buffers of units that read directly (bigjob.engine.tiers.direct)
        self.files: Files | None = None  # their open checkpoint files: closed when the hooks are removed
        self.unit_reads = {"mapped": 0, "direct": 0}  # disk-tier units run on the CPU so far, by how their bytes came
        self.slots: dict[torch.device, DeviceSlots] = {}  # per GPU: the buffers streamed units are copied into
        self.solo: set[int] = set()  # units the plan brings back one at a time (bigjob.engine.plan.budget_fallback)

    def add(self, unit: Any) -> int:
        self.units.append(unit)
        return len(self.units) - 1

    def release_later(self, ranges: list[Range]) -> None:
        """Unmap a unit's file pages on the prefetch thread, after the next unit's pages are in.

        Unmapping costs page-table work (~8 ms a GiB); done there it overlaps this thread's
        compute. :class:`RootHook` waits for it at the end of the forward, so resident memory
        is back within the budget when the forward returns.
        """
        if ranges:
            self.prefetcher.later(lambda: release(ranges))

    def ahead(self, position: int) -> None:
        """Prefetch the units after ``position``, up to one in ``solo``; nothing while a ``solo`` unit runs."""
        if self.solo and (position in self.solo or position - 1 in self.solo):
            self.prefetcher.settle()  # the unit before has released its pages: one unit in flight
        stop = 0 if position in self.solo else min(position + 1 + self.prefetcher.depth, len(self.units))
        for nxt in range(position + 1, stop):
            if nxt in self.solo:
                break
            unit = self.units[nxt]
            self.prefetcher.submit(nxt, unit.prepare, inline=getattr(unit, "queues_only", False))


class MoveInputs:
    """Moves a module's tensor arguments to its device (model parallel across GPUs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return move_to(args, self.device), move_to(kwargs, self.device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return output


@dataclass
class PagedUnit:
    """A disk-tier unit on the CPU: page its views in ahead of use and out after.

    With ``direct`` (and ``slots``, its file-backed tensors in the order of its layout), a
    forward may read the unit into a buffer instead and run on views of that buffer, when
    the page cache is found not to keep the file (:meth:`DirectReads.choose`).
    """

    name: str
    ranges: list[Range]
    schedule: Schedule
    keep: list[Range] = field(default_factory=list)  # tied tensors: released at the end of the forward
    position: int = -1
    direct: DirectReads | None = None
    slots: list[TensorSlot] = field(default_factory=list)
    _buffer: Any = field(default=None, repr=False)
    _base: int = field(default=0, repr=False)  # address of the buffer's tensor storage while installed

    def prepare(self) -> Any:
        """Bring the unit's bytes in: a buffer holding them, or ``True`` once its file pages are mapped."""
        if self.direct is not None:
            if self.direct.choose(self.ranges):
                return self.direct.read()
            self.direct.pool.trim()  # mapping from now on: the free read buffers would only add to resident memory
        populate(self.ranges, self.schedule.readahead)
        touch(self.ranges)  # first touches (costly on some virtual machines) here, not in the layer's compute
        return True

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ready = self.schedule.prefetcher.take(self.position)
        self.schedule.ahead(self.position)
        if ready is None:
            ready = self.prepare()
        if ready is not True:
            assert self.direct is not None
            self._buffer = ready
            views = self.direct.views(ready, [slot.home for slot in self.slots])
            self._base = views[0].untyped_storage().data_ptr() if views else 0
            for slot, view in zip(self.slots, views):
                slot.install(view)
            self.schedule.unit_reads["direct"] += 1
        else:
            self.schedule.unit_reads["mapped"] += 1
        return args, kwargs

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self._buffer is not None:
            assert self.direct is not None
            for slot in self.slots:
                slot.restore()
            buffer, self._buffer = self._buffer, None
            if any(t.device.type == "cpu" and t.untyped_storage().data_ptr() == self._base for t in _tensors(output)):
                # The output is (a view of) a weight: the buffer must live on with it, unchanged, so it
                # leaves the pool (the output's storage keeps it alive) and a new one takes its place.
                self.direct.pool.abandon(buffer)
            else:
                self.direct.pool.release(buffer)
        else:
            self.schedule.release_later(self.ranges)
        return output


def _pack_layout(slots: Sequence[TensorSlot]) -> int:
    """Assign each slot its offset in a packed buffer; return the buffer's size in bytes."""
    offset = 0
    for slot in slots:
        offset += -offset % _ALIGN
        slot.offset = offset
        offset += slot.home.numel() * slot.home.element_size()
    return offset


class StreamedUnit:
    """A unit whose weights live in CPU RAM or on disk and run on an accelerator, one transfer per forward."""

    def __init__(self, name: str, slots: list[TensorSlot], device: torch.device, schedule: Schedule, staging: StagingPool | None,
                 ranges: list[Range] | None = None) -> None:
        self.name = name
        self.slots = slots
        self.ranges = ranges or []  # page ranges of homes that are file views: mapped for the copy only
        self.device = device
        self.schedule = schedule
        self.position = -1
        self.size = _pack_layout(slots)
        self.staging = staging  # None: the homes are already packed in one pinned buffer
        self.packed: torch.Tensor | None = None
        if staging is None:
            self._pack_home()
        # Preparing a pinned unit for a GPU only queues its copy: done inline (see Prefetcher.submit).
        self.queues_only = self.packed is not None and device.type == "cuda"
        self._held: list[int | None] = []  # DeviceSlots buffers of the forwards running this unit

    def _pack_home(self) -> None:
        """Move CPU-tier homes into one (pinned) buffer so the unit travels in a single copy."""
        buffer = pinned_empty(self.size, pin=self.device.type == "cuda")
        for slot in self.slots:
            view = _view(buffer, slot)
            view.copy_(slot.home)
            slot.home = view
            if slot.is_param:
                slot._home_param = nn.Parameter(view, requires_grad=False)
                slot.module._parameters[slot.local] = slot._home_param
            else:
                slot.module._buffers[slot.local] = view
        self.packed = buffer

    def prepare(self) -> tuple[torch.Tensor, Any, int | None]:
        """Copy the unit to the device on a side stream.

        Returns the device buffer, the event that marks the copy done, and the index of the
        :class:`DeviceSlots` buffer it holds (``None``: a buffer of its own).
        """
        if not self.size and self.device.type == "cuda":  # only tied tensors, kept on the device: nothing to copy
            return torch.empty(0, dtype=torch.uint8, device=self.device), None, None
        if self.packed is not None:
            source = self.packed
            slot_pool = None
        else:
            assert self.staging is not None
            slot_pool, source = self.staging.acquire(self.size)
            populate(self.ranges, self.schedule.readahead)  # in bulk, not a fault per page
            # CPU memcpy from the file mapping, every tensor in one call: the GIL is let go once, not per tensor.
            if self.slots:
                torch._foreach_copy_([_view(source, slot) for slot in self.slots], [slot.home for slot in self.slots])
            release(self.ranges)  # the bytes are in the staging buffer: RSS back within the budget
        if self.device.type == "cuda":
            stream = self.schedule_stream()
            slots = self.schedule.slots.get(self.device)
            with torch.cuda.stream(stream):
                index, target, after = slots.acquire(self.size) if slots is not None else (None, None, None)
                if target is None:
                    target = torch.empty(self.size, dtype=torch.uint8, device=self.device)
                if after is not None:
                    stream.wait_event(after)  # the kernels that read this buffer last: waited for on the GPU
                target.copy_(source[: self.size], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            if slot_pool is not None:
                self.staging.release(slot_pool, event)  # type: ignore[union-attr]
            return target, event, index
        target = source[: self.size].to(self.device, copy=True)  # the staging buffer is reused at once
        if slot_pool is not None:
            self.staging.release(slot_pool, None)  # type: ignore[union-attr]
        return target, None, None

    _streams: dict[torch.device, Any] = {}

    def schedule_stream(self) -> Any:
        stream = StreamedUnit._streams.get(self.device)
        if stream is None:
            stream = StreamedUnit._streams[self.device] = torch.cuda.Stream(self.device)
        return stream

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        ready = self.schedule.prefetcher.take(self.position)
        self.schedule.ahead(self.position)
        return self.enter(args, kwargs, ready)

    def enter(self, args: tuple, kwargs: dict, ready: tuple[torch.Tensor, Any, int | None] | None) -> tuple[tuple, dict]:
        """Install the unit's weights from ``ready`` (a prefetched :meth:`prepare`), or copy them now."""
        target, event, index = ready if ready is not None else self.prepare()
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            # Made on the copy stream: when it is freed (a buffer of its own after this forward, the
            # reused ones with the dispatch), the allocator waits for these kernels before reusing it.
            target.record_stream(current)
        self._held.append(index)
        for slot in self.slots:
            slot.install(_view(target, slot))
        # Inputs may come from a unit on another GPU (model parallel); a no-op when already here.
        return move_to(args, self.device), move_to(kwargs, self.device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        for slot in self.slots:
            slot.restore()
        index = self._held.pop() if self._held else None
        if index is not None:  # its kernels are queued: the buffer may take the next copy once they ran
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self.schedule.slots[self.device].release(index, done)
        return output


def _view(buffer: torch.Tensor, slot: TensorSlot) -> torch.Tensor:
    nbytes = slot.home.numel() * slot.home.element_size()
    return buffer[slot.offset : slot.offset + nbytes].view(slot.home.dtype).view(slot.home.shape)


class DeviceSlots:
    """Device buffers that streamed units are copied into in turn: ``count`` of ``size`` bytes, made once.

    ``count`` is ``1 + prefetch``, the room the planner keeps on the device. A unit holds a
    buffer from its copy until its kernels are queued; the next copy into that buffer waits
    for those kernels on the GPU (an event on the copy stream), never on the host, so the
    host runs ahead queueing work while memory stays bounded. When every buffer is held (a
    module run out of the order the schedule expects) the copy gets a buffer of its own
    from PyTorch's allocator: correct, only larger.
    """

    def __init__(self, device: torch.device, size: int, count: int) -> None:
        self.device = device
        self.size = size
        self.count = count
        self.buffers: list[torch.Tensor] = []  # allocated at the first copy
        self.done: list[Any] = [None] * count  # per buffer: event after the kernels that read it last
        self.free = list(range(count - 1, -1, -1))
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> tuple[int | None, torch.Tensor | None, Any]:
        """A free buffer's index, its first ``nbytes`` and the event to wait for; ``(None, None, None)`` if none is free."""
        with self._lock:
            if nbytes > self.size or not self.free:
                return None, None, None
            index = self.free.pop()
            if not self.buffers:
                self.buffers = [torch.empty(self.size, dtype=torch.uint8, device=self.device) for _ in range(self.count)]
            return index, self.buffers[index][:nbytes], self.done[index]

    def release(self, index: int, done: Any) -> None:
        with self._lock:
            self.done[index] = done
            if index not in self.free:
                self.free.append(index)

    def reset(self) -> None:
        """Every buffer free again (the events stay: a copy into one still waits for its last kernels)."""
        with self._lock:
            self.free = list(range(self.count - 1, -1, -1))


class StagingPool:
    """Pinned staging buffers, allocated once and reused, for disk-tier units bound for a GPU."""

    def __init__(self, size: int, count: int, pin: bool) -> None:
        self.buffers = [pinned_empty(size, pin) for _ in range(count)]
        self.events: list[Any] = [None] * count
        self.free = list(range(count))
        self.cond = threading.Condition()

    def acquire(self, size: int) -> tuple[int, torch.Tensor]:
        with self.cond:
            while not self.free:
                self.cond.wait()
            index = self.free.pop()
        event = self.events[index]
        if event is not None:
            event.synchronize()  # the last copy out of this buffer has finished
        return index, self.buffers[index]

    def release(self, index: int, event: Any) -> None:
        with self.cond:
            self.events[index] = event
            self.free.append(index)
            self.cond.notify()


class RootHook:
    """Inputs to the execution device, prefetch primed, outputs back where the inputs were."""

    def __init__(self, device: torch.device, schedule: Schedule, tied_ranges: list[Range], streamed: list[Range] | None = None,
                 sources: Sources | None = None) -> None:
        self.device = device
        self.schedule = schedule
        self.sources = sources  # files the weights are mapped from: checked for in-place changes before each forward
        self.tied_ranges = merge(tied_ranges)
        self._origin = threading.local()
        # File pages every forward maps and unmaps (tied ones included): checked once, after the
        # first forward, for small page-cache folios (see bigjob.engine.tiers.folios).
        self._unchecked = list(streamed or [])

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        origin = first_device(args, kwargs)
        stack = getattr(self._origin, "stack", None)
        if stack is None:
            stack = self._origin.stack = []
        if not stack and self.sources is not None:
            self.sources.check()  # before anything reads a page of a file that may have shrunk
        stack.append(origin)
        pinned = self.schedule.pinned
        self.schedule.tokens = pinned if pinned is not None else count_tokens(args, kwargs)
        self.schedule.ahead(-1)
        return move_to(args, self.device), move_to(kwargs, self.device)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        stack = getattr(self._origin, "stack", None)
        if not stack:  # pre_forward raised before its push (a changed checkpoint): nothing ran
            return output
        origin = stack.pop()
        self.schedule.prefetcher.settle()
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
                if refresh_small_folios(unchecked):
                    for unit in self.schedule.units:  # those pages were dropped by us, not by a cache too small
                        if getattr(unit, "direct", None) is not None:
                            unit.direct.forget()
            except Exception:  # noqa: BLE001 - a speed-up only: the forward's result is already made
                log.debug("page-cache folio check failed", exc_info=True)
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
