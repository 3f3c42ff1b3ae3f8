"""Step 4 of a job: the cache folders it reads weights from, chosen under the cache's gate and locked until it ends.

Two folders may come from the cache: the demo checkpoint (``checkpoint.source=demo``), and
the offload folder of the converted disk-tier weights. The offload folder is the registry's
folder for the offload fingerprint (checkpoint, tensors, target dtypes, disk modules), or a
folder built for a plan with more on disk that holds these tensors already (a smaller
budget of a sweep); an explicit ``placement.offload_folder`` is used as given, and without
a cache the run folder holds it. Both are chosen under the cache's gate lock and then held
with use locks, so pruning (``cache.max_size``, ``bigjob-cache prune``) never removes them
while the job runs.

>>> import tempfile
>>> root = Path(tempfile.mkdtemp())
>>> in_cache(root / "offload" / "ab", root), in_cache(root, root)  # a folder that is not there is not the cache's
(False, False)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigjob.job.cache import JobCache
from bigjob.job.cache_locks import gate_lock, use_lock
from bigjob.job.checked_job import CheckedJob
from bigjob.job.checkpoint_source import make_demo_checkpoint_for
from bigjob.job.device_plan import Placement
from bigjob.job.fingerprint import OffloadInputs, offload_fingerprint
from bigjob.job.prune import touch

__all__ = ["JobFolders", "choose_folders", "in_cache", "remember_offload"]


@dataclass(frozen=True)
class JobFolders:
    """What step 4 hands on: the checkpoint to load and where converted disk-tier weights go."""

    checkpoint_path: Path  # the demo checkpoint made by now
    offload_folder: Path
    offload_key: str  # offload_fingerprint: the registry entry offload:<key>, and the lock that builds it once
    offload_family: str  # the same without the disk modules: folders of one family differ only in what they hold
    registry: bool  # the offload folder is the cache registry's (locked against pruning, touched when used)


def in_cache(folder: Path, cache_root: Path) -> bool:
    """Whether ``folder`` is a folder of the cache at ``cache_root`` (a moved cache's registry names another place)."""
    offload = (Path(cache_root).expanduser().absolute() / "offload").resolve()
    try:
        return folder.is_dir() and folder.resolve().is_relative_to(offload)
    except OSError:
        return False


def _registry_folder(cache: JobCache, cache_root: Path, key: str, family: str, disk_modules: list[str]) -> Path:
    """The cache's offload folder for ``key``: the one served before, one of the family holding these tensors, or a new one."""
    folder = cache.offload_dir(key)
    if not disk_modules:
        return folder
    served = cache.get(f"offload:{key}")
    if served is not None and in_cache(Path(str(served.get("path", ""))), cache_root):
        return Path(served["path"]).parent  # served before, perhaps by a larger folder
    # Not built for this plan yet: a plan with more on disk (a smaller budget of a
    # sweep) may have built a folder that holds these tensors already.
    holding = cache.offload_holding(family, disk_modules)
    return holding if holding is not None and in_cache(holding, cache_root) else folder


def choose_folders(job: CheckedJob, placement: Placement, cache: JobCache | None, uses: contextlib.ExitStack) -> JobFolders:
    """Step 4: the checkpoint (the demo one made now) and the offload folder; the cache's ones held in ``uses`` until the job ends."""
    cfg, root, disk_modules = job.cfg, job.cache_root, placement.disk_modules
    inputs = placement.inputs
    offload_inputs = OffloadInputs(job.checkpoint.identity, inputs.tensors, inputs.dtype, dict(inputs.special_dtypes), disk_modules,
                                   cfg.placement.offload_buffers, compression=cfg.placement.offload_compression)
    key = offload_fingerprint(offload_inputs)
    family = offload_fingerprint(dataclasses.replace(offload_inputs, disk_modules=[]))
    demo_folder = None
    registry = cache is not None and bool(disk_modules) and not cfg.placement.offload_folder
    with gate_lock(root) if job.checkpoint.path is None or registry else contextlib.nullcontext():
        if job.checkpoint.path is None:
            from bigjob.models.demo import demo_checkpoint_folder

            demo_folder = demo_checkpoint_folder(root / "checkpoints", dict(cfg.model.kwargs), cfg.checkpoint.demo_seed)
            uses.enter_context(use_lock(root, demo_folder))
        if cfg.placement.offload_folder:
            offload_folder = Path(cfg.placement.offload_folder).expanduser().absolute()
        elif cache is not None:
            offload_folder = _registry_folder(cache, root, key, family, disk_modules)
            if registry:
                uses.enter_context(use_lock(root, offload_folder))
        else:
            offload_folder = job.run_dir / "offload"
    checkpoint_path = job.checkpoint.path if demo_folder is None else make_demo_checkpoint_for(cfg, demo_folder)
    assert checkpoint_path is not None  # a path source, or the demo folder chosen above
    return JobFolders(checkpoint_path, offload_folder, key, family, registry)


def remember_offload(job: CheckedJob, placement: Placement, folders: JobFolders, served_from: str | None, cache: JobCache | None) -> None:
    """After loading: a registry folder is marked used now (for pruning), and the registry records the folder the
    engine served the disk tier from (``served_from``; None: nothing on disk), so the next job with this plan finds it."""
    if folders.registry:
        touch(folders.offload_folder)  # its last use, for pruning
    if cache is None or not served_from or job.cfg.placement.offload_folder:
        return
    record: dict[str, Any] = {
        "kind": "offload", "path": str(served_from), "checkpoint": job.checkpoint.identity, "dtype": placement.inputs.dtype,
        "disk_modules": sorted(placement.disk_modules), "family": folders.offload_family, "model_class": job.model_class,
        "created": time.time(),
    }
    cache.set(f"offload:{folders.offload_key}", record)
