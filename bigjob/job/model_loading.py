"""Step 5 of a job: the checkpoint loaded into the empty model and the model dispatched, through the engine.

The engine's :func:`~bigjob.engine.run.entry_points.load_checkpoint_and_dispatch` streams
each tensor to the tier the plan gives it and attaches the hooks that bring offloaded units
to the execution device; a Transformers folder goes through
:func:`bigjob.models.hf.load_and_dispatch` (the engine's, minus the keys Transformers
ignores too). A shared offload folder is built under a cache lock, so concurrent jobs build
it once, and with ``cache.max_size`` room is made for it first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from bigjob.errors import JobError
from bigjob.job.cache import JobCache
from bigjob.job.cache_folder import make_private_dirs
from bigjob.job.cache_limit import prune_to
from bigjob.job.checked_job import CheckedJob
from bigjob.job.device_plan import Placement
from bigjob.job.half_on_cpu import warn_if_slow
from bigjob.job.job_folders import JobFolders
from bigjob.job.schema import rate_overrides

if TYPE_CHECKING:
    from bigjob.engine.run.dispatch_info import DispatchInfo

__all__ = ["LoadedModel", "engine_dispatch", "load_job_model"]


@dataclass(frozen=True)
class LoadedModel:
    """What step 5 hands on: the dispatched model and what dispatch left on it."""

    model: nn.Module
    info: DispatchInfo  # main device, bytes per tier, load time, offload folder, the mapped files

    def detach(self) -> None:
        """Stops the prefetch thread and drops the hooks: the next job of a sweep starts clean."""
        self.info.detach()


def engine_dispatch() -> tuple[Callable[..., nn.Module], Callable[[nn.Module], Any]]:
    """The engine's ``(load_checkpoint_and_dispatch, get_dispatch_info)``, imported when a job loads weights.

    >>> load, info = engine_dispatch()
    >>> load.__name__, info.__name__
    ('load_checkpoint_and_dispatch', 'get_dispatch_info')
    """
    from bigjob.engine.run.dispatch_info import get_dispatch_info
    from bigjob.engine.run.entry_points import load_checkpoint_and_dispatch
    return load_checkpoint_and_dispatch, get_dispatch_info


def _load(job: CheckedJob, placement: Placement, folders: JobFolders, cache: JobCache | None) -> nn.Module:
    """The model with its weights where the plan puts them, in eval mode."""
    cfg, disk_modules = job.cfg, placement.disk_modules
    load_checkpoint_and_dispatch = engine_dispatch()[0]
    if job.model_dir is not None:
        from bigjob.models.hf import load_and_dispatch

        load_checkpoint_and_dispatch = load_and_dispatch  # the engine's, minus the keys Transformers ignores too

    def load() -> nn.Module:
        return load_checkpoint_and_dispatch(
            job.model,
            str(folders.checkpoint_path),
            device_map=placement.device_map,
            dtype=job.dtypes.dtype,
            special_dtypes=job.dtypes.special or None,
            offload_folder=str(folders.offload_folder) if disk_modules else None,
            offload_buffers=cfg.placement.offload_buffers,
            prefetch=cfg.placement.prefetch,
            # The units the plan was made of are the units dispatch streams: a decoder layer in one
            # read, not each of its Linears in its own (an explicit map is taken as the user wrote it).
            no_split_module_classes=list(cfg.model.no_split_module_classes) if cfg.placement.strategy != "explicit" else None,
            strict=cfg.checkpoint.strict,
            # How offloaded units run; not a plan input (the map and the offload folder do not depend on it).
            execution=cfg.placement.execution,
            execution_rates=rate_overrides(cfg.placement.rates) or None,
            disk_reads=cfg.placement.disk_reads,
            offload_compression=cfg.placement.offload_compression,
        )

    if disk_modules:
        make_private_dirs(folders.offload_folder.parent)
    if cache is not None and disk_modules:
        from bigjob.engine.tiers.store import before_offload_build

        max_size = cfg.cache.max_size
        # cache.max_size holds while the folder is built too: room is made first (a full disk fails the build).
        room = before_offload_build(lambda nbytes: prune_to(cache, max_size, nbytes)) if max_size is not None else contextlib.nullcontext()
        with cache.lock(f"offload:{folders.offload_key}"), room:
            return load().eval()
    return load().eval()


def load_job_model(job: CheckedJob, placement: Placement, folders: JobFolders, cache: JobCache | None) -> LoadedModel:
    """Step 5: loads and dispatches the job's model; warns once when its dtype runs emulated on this CPU."""
    model = _load(job, placement, folders, cache)
    info = engine_dispatch()[1](model)
    if info is None:
        raise JobError("the engine returned a model without dispatch information; this is a bug in bigjob")
    warn_if_slow(job.dtypes.dtype_name, info.main_device)  # bf16/fp16 emulated on CPUs without the instructions
    return LoadedModel(model, info)
