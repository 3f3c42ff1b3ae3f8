"""What a dispatched model is: the :class:`DispatchInfo` its dispatch leaves on it, and taking it off again.

:func:`get_dispatch_info` says where the weights went and what loading cost;
:func:`remove_dispatch` takes the hooks off; :func:`execution_tokens` pins the token count
its ``auto`` units decide by for a block of forwards (a generation).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from bigjob.engine.plan.device_map import DeviceMap
from bigjob.engine.run.execution import ExecutionPlan
from bigjob.engine.run.hooks import HookHandle
from bigjob.engine.run.prefetcher import Prefetcher, Schedule
from bigjob.engine.tiers.sources import Sources

__all__ = ["DispatchInfo", "execution_tokens", "get_dispatch_info", "remove_dispatch", "set_dispatch_info"]

_ATTR = "_bigjob_dispatch"


@dataclass
class DispatchInfo:
    """What a dispatched model is: its map, execution device, bytes per tier and load figures.

    ``streamed_units`` always stream to the accelerator, ``local_units`` always run on the
    CPU there, ``auto_units`` choose per forward (see :attr:`execution`); ``paged_units`` are
    disk-tier units of a model executing on the CPU. ``sources`` are the files its weights are
    views of, checked before every forward for a change in place (see :mod:`bigjob.engine.tiers.sources`).
    """

    device_map: DeviceMap
    main_device: str
    bytes_per_tier: dict[str, int]
    load_seconds: float
    offload_folder: str | None
    offload_reused: bool | None
    prefetch: int
    streamed_units: int
    paged_units: int
    local_units: int = 0
    auto_units: int = 0
    execution: ExecutionPlan | None = field(default=None, repr=False)
    handles: list[HookHandle] = field(default_factory=list, repr=False)
    prefetcher: Prefetcher | None = field(default=None, repr=False)
    schedule: Schedule | None = field(default=None, repr=False)
    sources: Sources | None = field(default=None, repr=False)  # the files the weights are mapped from
    offload_compression: str = "none"  # how the streamed tiers' Linear weights are stored (bigjob.engine.plan.compression)

    def detach(self) -> None:
        """Remove every hook and stop the prefetch thread; the weights stay where they are."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if self.prefetcher is not None:
            self.prefetcher.close()
            self.prefetcher = None
        if self.schedule is not None:
            if self.schedule.reads is not None:  # the disk reader's thread
                self.schedule.reads.close()
            if self.schedule.files is not None:  # descriptors of direct reads: not left to the garbage collector
                self.schedule.files.close()
            if self.schedule.pool is not None:
                self.schedule.pool.trim()
            # Units and schedule refer to each other, and units hold the model's tensor slots: without
            # this the model (and the checkpoint files its views keep open) would wait for the cyclic GC.
            self.schedule.units.clear()


def get_dispatch_info(model: nn.Module) -> DispatchInfo | None:
    """The :class:`DispatchInfo` of a dispatched model, or ``None``."""
    return getattr(model, _ATTR, None)


def set_dispatch_info(model: nn.Module, info: DispatchInfo) -> None:
    """Record ``info`` on ``model`` (what :func:`get_dispatch_info` returns), past any ``__setattr__`` of its class."""
    object.__setattr__(model, _ATTR, info)


@contextmanager
def execution_tokens(model: nn.Module, tokens: int | None) -> Iterator[None]:
    """Decide ``auto`` units once for every forward inside the block, as if each had ``tokens`` tokens.

    A generation calls the model once for the prompt and once per new token. Deciding per
    forward would run a layer's prompt on the accelerator and its decoding on the CPU, away
    from its KV cache. Pinning one count for the whole generation keeps each layer on one
    device throughout; the average tokens per forward is the count that minimises the total
    under the cost model (linear in tokens for local runs, a fixed copy per forward for
    streamed ones). ``None`` counts each forward's own tokens again; nested blocks restore
    the outer count. No effect on a model that is not dispatched or has no ``auto`` units.

    >>> import torch
    >>> from torch import nn
    >>> from bigjob.engine.run.entry_points import cpu_offload
    >>> model = cpu_offload(nn.Linear(4, 4))
    >>> with execution_tokens(model, 1):
    ...     _ = model(torch.randn(8, 4))
    ...     get_dispatch_info(model).schedule.tokens
    1
    >>> _ = model(torch.randn(8, 4)); get_dispatch_info(model).schedule.tokens
    8
    """
    info = get_dispatch_info(model)
    schedule = info.schedule if info is not None else None
    if schedule is None:
        yield
        return
    outer, schedule.pinned = schedule.pinned, tokens
    try:
        yield
    finally:
        schedule.pinned = outer


def remove_dispatch(model: nn.Module) -> nn.Module:
    """Take bigjob's hooks off ``model`` and return it as a plain module."""
    info = get_dispatch_info(model)
    if info is not None:
        info.detach()
        model.__dict__.pop(_ATTR, None)
        model.__dict__.pop("hf_device_map", None)
    return model
