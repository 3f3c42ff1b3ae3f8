"""Steps 2 and 3 of a job: the plan's inputs fingerprinted, and the device map taken from the cache or computed once.

Every input that changes the plan is in :class:`~bigjob.job.fingerprint.PlanInputs` (model
class and kwargs, tensors, dtypes, budgets, strategy, no-split classes, prefetch, working
memory, devices, checkpoint identity, planner version); their fingerprint keys the cache
entry ``plan:<key>``, computed at most once across concurrent processes. An explicit map
(``placement.strategy=explicit``) is taken as the user wrote it; its key is still recorded.

>>> import tempfile
>>> from bigjob.job.checked_job import check_job
>>> from bigjob.job.schema import JobConfig
>>> cfg = JobConfig(mode="plan")
>>> cfg.model.kwargs = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "vocab_size": 64}
>>> placement = plan_placement(check_job(cfg, Path(tempfile.mkdtemp())), cache=None)
>>> len(placement.key), placement.cache_hit, placement.disk_modules  # the tiny model fits the free memory
(64, None, [])
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bigjob.errors import BudgetError
from bigjob.job.cache import JobCache
from bigjob.job.checked_job import CheckedJob
from bigjob.job.config_terms import in_config_terms
from bigjob.job.fingerprint import PlanInputs, plan_fingerprint, tensor_signature
from bigjob.job.report import DEVICE_MAP_NAME, atomic_write_text
from bigjob.job.working_memory import working_memory_bytes

if TYPE_CHECKING:
    from bigjob.engine.plan.device_map import DeviceMap

__all__ = ["Placement", "plan_inputs", "plan_placement", "write_device_map"]


@dataclass(frozen=True)
class Placement:
    """What steps 2-3 hand on: the plan's inputs and key, the device map, and how it was got."""

    inputs: PlanInputs
    key: str  # plan_fingerprint(inputs): the cache entry plan:<key>
    device_map: DeviceMap
    cache_hit: bool | None  # None: no cache (or an explicit map)
    seconds: float  # taking or computing the map (the working-memory estimate not included)

    @property
    def disk_modules(self) -> list[str]:
        """The modules the map puts on the disk tier, in map order."""
        return [name for name, device in self.device_map.items() if device == "disk"]


def plan_inputs(job: CheckedJob) -> PlanInputs:
    """Step 2: everything the device map depends on (``working_memory`` still 0: :func:`plan_placement` adds it)."""
    from bigjob.engine.plan.devices import device_inventory
    from bigjob.engine.plan.planner import PLANNER_VERSION

    cfg = job.cfg
    model_kwargs = {"_target_": cfg.model._target_, **dict(cfg.model.kwargs)}
    if job.model_dir is not None:
        model_kwargs["model_dir"] = job.model_dir.identity()  # config.json's hash: another config, another plan
    return PlanInputs(
        model_class=job.model_class,
        model_kwargs=model_kwargs,
        tensors=tensor_signature(job.model),
        dtype=job.dtypes.dtype_name,
        special_dtypes=job.dtypes.special_names,
        budgets=job.budgets,
        strategy=cfg.placement.strategy,
        no_split=list(cfg.model.no_split_module_classes),
        prefetch=cfg.placement.prefetch,
        strict_budget=cfg.placement.strict_budget,
        offload_compression=cfg.placement.offload_compression,
        devices=device_inventory(),
        checkpoint=job.checkpoint.identity,
        planner_version=PLANNER_VERSION,
    )


def _planned_map(job: CheckedJob, inputs: PlanInputs, plan_key: str, cache: JobCache | None) -> tuple[DeviceMap, bool | None]:
    """``(device map, plan cache hit)``, computed at most once per key across processes."""
    from bigjob.engine.plan.device_map import DeviceMap
    from bigjob.engine.plan.resolution import infer_auto_device_map

    cfg = job.cfg

    def compute() -> dict[str, Any]:
        try:
            planned = infer_auto_device_map(
                job.model,
                max_memory=dict(inputs.budgets),
                no_split_module_classes=list(cfg.model.no_split_module_classes),
                dtype=job.dtypes.dtype,
                special_dtypes=job.dtypes.special or None,
                strategy=cfg.placement.strategy,
                prefetch=cfg.placement.prefetch,
                working_memory=inputs.working_memory, strict_budget=inputs.strict_budget, offload_compression=inputs.offload_compression,
            ).to_dict()
        except BudgetError as err:
            raise type(err)(in_config_terms(str(err))) from None
        return {"kind": "plan", "device_map": planned["device_map"], "summary": planned["plan"], "inputs": inputs.describe()}

    hit: bool | None = None
    if cache is not None:
        entry, hit = cache.compute_once(f"plan:{plan_key}", compute)
    else:
        entry = compute()
    return DeviceMap.from_json({"device_map": entry["device_map"], "plan": entry.get("summary")}), hit


def plan_placement(job: CheckedJob, cache: JobCache | None) -> Placement:
    """Steps 2-3: the plan's inputs and key; the device map explicit, from the cache, or computed and stored."""
    inputs = plan_inputs(job)
    if job.cfg.placement.working_memory is not None:  # validate() refuses it with an explicit map
        inputs = dataclasses.replace(inputs, working_memory=working_memory_bytes(job, inputs, cache))
    key = plan_fingerprint(inputs)
    t0 = time.perf_counter()
    if job.explicit_map is not None:
        device_map, hit = job.explicit_map, None
    else:
        device_map, hit = _planned_map(job, inputs, key, cache)
    return Placement(inputs, key, device_map, hit, time.perf_counter() - t0)


def write_device_map(run_dir: Path, placement: Placement) -> Path:
    """Writes ``device_map.json`` (the map and its plan summary) into ``run_dir`` atomically."""
    path = run_dir / DEVICE_MAP_NAME
    atomic_write_text(path, placement.device_map.to_json() + "\n")
    return path
