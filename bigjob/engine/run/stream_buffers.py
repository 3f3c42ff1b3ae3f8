"""The buffers streamed units travel through: pinned staging buffers on the host, reused slots on the device.

Both are made once per dispatch and reused by every forward, so a streamed model's memory is
bounded by the planner's room (``1 + prefetch`` units in flight), not by how many units run.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from bigjob.engine.tiers.pinned import pinned_empty

__all__ = ["DeviceSlots", "StagingPool"]


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
