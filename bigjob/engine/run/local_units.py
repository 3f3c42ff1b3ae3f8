"""Hooks for offloaded units that run on the CPU, where their weights live, while the model executes on an accelerator.

* :class:`LocalUnit` (execution policy ``local``): the unit's tensor arguments are moved to
  the CPU, it computes there on its home weights (CPU RAM, or zero-copy views of files whose
  pages are mapped in ahead of use and released after, as :class:`~.paged_units.PagedUnit` does),
  and its outputs are moved back to the execution device. Its weights never reach the device.
* :class:`AutoUnit` (policy ``auto``): a :class:`~.streamed_units.StreamedUnit` and a
  :class:`LocalUnit` over the same weights; each forward runs one of them, chosen from the
  token count :class:`~.hooks.RootHook` put on the :class:`~.prefetcher.Schedule` (local at or
  below the unit's threshold). The prefetcher prepares the unit in the mode it will run in,
  so a unit that runs locally costs no copy to the device.

Outputs go back to the execution device whatever the inputs' device was: the next unit
runs there. Objects the hooks do not look into (e.g. a Transformers ``Cache``) keep their
tensors where the layer that wrote them computed: with ``auto``, a layer that switched mode
between the calls of one generation would meet its cached keys on the other device, so a
generation pins one decision for all its steps (:func:`~.dispatch_info.execution_tokens`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from bigjob.engine.run.hooks import move_to
from bigjob.engine.run.prefetcher import Schedule
from bigjob.engine.run.streamed_units import StreamedUnit
from bigjob.engine.tiers.pages import Range, populate

__all__ = ["AutoUnit", "LocalUnit"]

_CPU = torch.device("cpu")


class LocalUnit:
    """An offloaded unit computed on the CPU: inputs to the CPU, file pages in and out, outputs back to ``device``."""

    def __init__(self, name: str, ranges: list[Range], device: torch.device, schedule: Schedule) -> None:
        self.name = name
        self.ranges = ranges  # merged page ranges of its file-backed weights (disk tier); empty in RAM
        self.device = device
        self.schedule = schedule
        self.position = -1

    def prepare(self) -> bool:
        """Map the unit's file pages in (a no-op in RAM); ``True`` marks a prefetch as done."""
        if self.ranges:
            populate(self.ranges, self.schedule.readahead)
        return True

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        prepared = self.schedule.prefetcher.take(self.position)
        self.schedule.ahead(self.position)
        return self.enter(args, kwargs, prepared)

    def enter(self, args: tuple, kwargs: dict, prepared: Any) -> tuple[tuple, dict]:
        if prepared is None:
            self.prepare()
        # Device-to-host copies are synchronous (move_to): the CPU reads them at once.
        return move_to(args, _CPU), move_to(kwargs, _CPU)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        self.schedule.release_later(self.ranges)
        return move_to(output, self.device)


class AutoUnit:
    """Streamed or local per forward: local when the forward's tokens are at most ``threshold``."""

    def __init__(self, stream: StreamedUnit, local: LocalUnit, threshold: int, schedule: Schedule) -> None:
        self.name = stream.name
        self.stream = stream
        self.local = local
        self.threshold = threshold
        self.schedule = schedule
        self.position = -1
        self._active = threading.local()
        # Either way only device work is queued (a pinned copy, or nothing for weights in RAM): prepared
        # inline, as a pinned StreamedUnit is (on the H200 the prefetch thread's hand-off cost 15-20 ms a forward).
        self.queues_only = stream.queues_only and not local.ranges

    def mode(self) -> str:
        """``"local"`` or ``"stream"`` for the current root forward (unknown token count: stream)."""
        tokens = self.schedule.tokens
        return "local" if tokens is not None and tokens <= self.threshold else "stream"

    def prepare(self) -> tuple[str, Any]:
        """Prepare in the mode this forward will use; the mode travels with the result."""
        mode = self.mode()
        return mode, (self.local if mode == "local" else self.stream).prepare()

    def pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        prepared = self.schedule.prefetcher.take(self.position)
        self.schedule.ahead(self.position)
        mode = self.mode()
        # A prefetch made for another token count (a forward that skipped this unit) is dropped.
        ready = prepared[1] if prepared is not None and prepared[0] == mode else None
        stack = getattr(self._active, "stack", None)
        if stack is None:
            stack = self._active.stack = []
        unit = self.local if mode == "local" else self.stream
        stack.append(unit)
        return unit.enter(args, kwargs, ready)

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        return self._active.stack.pop().post_forward(module, output)
