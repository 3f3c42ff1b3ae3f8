"""Streamed units: weights that live in CPU RAM or on disk, copied to an accelerator for each forward.

A :class:`StreamedUnit`'s tensors are packed in one pinned buffer (CPU tier) or gathered into a
pinned staging buffer (disk tier), copied in one transfer (on a side stream, ahead of time,
by the prefetcher) into a device buffer, swapped in for the forward and dropped after. The
buffers they travel through are in :mod:`bigjob.engine.run.stream_buffers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from bigjob.engine.run.hooks import TensorSlot, move_to
from bigjob.engine.run.prefetcher import Schedule
from bigjob.engine.run.stream_buffers import StagingPool
from bigjob.engine.tiers.pages import Range, populate, release
from bigjob.engine.tiers.pinned import pinned_empty

__all__ = ["StreamedUnit"]

_ALIGN = 256  # bytes: every tensor in a packed buffer starts at a multiple of this


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
