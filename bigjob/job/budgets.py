"""The job's memory budgets: ``placement.max_memory`` in bytes per device, and the devices it needs.

A budget the user set is taken as given; a device left unset gets its free memory rounded
down to :data:`AUTO_BUDGET_QUANTUM`, so that small changes in free memory between runs keep
the same plan (and its cache entry). Disk is unlimited unless set.

>>> from bigjob.job.schema import JobConfig
>>> cfg = JobConfig()
>>> cfg.placement.max_memory.cpu = "1GiB"
>>> resolve_budgets(cfg)["cpu"]
1073741824
>>> job_budgets(cfg)["cpu"]  # a run checks that the budgeted devices exist here
1073741824
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from bigjob.errors import BudgetError, DeviceError
from bigjob.job.config_terms import in_config_terms
from bigjob.job.schema import JobConfig, budget_overrides

__all__ = ["AUTO_BUDGET_QUANTUM", "check_budgeted_devices", "job_budgets", "resolve_budgets"]

# Budgets the user left to the device's free memory are rounded down to this, so that
# small changes in free memory between runs keep the same plan (and its cache entry).
AUTO_BUDGET_QUANTUM = 256 * 2**20


def resolve_budgets(cfg: JobConfig) -> dict[str, int]:
    """Budgets in bytes per canonical device; unset devices get free memory rounded down."""
    from bigjob.engine.plan.devices import DISK, get_max_memory, normalize_device

    user = budget_overrides(cfg.placement.max_memory)
    try:
        budgets = get_max_memory(user)
    except BudgetError as err:
        raise BudgetError(in_config_terms(str(err))) from None
    named = {normalize_device(k) for k in user}
    for device, size in budgets.items():
        if device not in named and device != DISK:
            budgets[device] = size // AUTO_BUDGET_QUANTUM * AUTO_BUDGET_QUANTUM
    return budgets


def check_budgeted_devices(cfg: JobConfig, budgets: Mapping[str, int]) -> None:
    """A run needs every device it budgets; names the ``placement.max_memory`` key of one this machine lacks."""
    from bigjob.engine.plan.devices import normalize_device
    from bigjob.engine.run.loading import check_devices

    for key, value in budget_overrides(cfg.placement.max_memory).items():
        device = normalize_device(key)
        try:
            if budgets.get(device, 0) > 0:
                check_devices([device])
        except DeviceError:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            raise DeviceError(
                f"placement.max_memory.{key}={value} budgets {device}, which this machine does not have ({have} CUDA GPU(s)); "
                f"remove placement.max_memory.{key}, or use mode=plan to plan for another machine"
            ) from None


def job_budgets(cfg: JobConfig) -> dict[str, int]:
    """The budgets a job plans with; a run (not ``mode=plan``, which may target another machine) first checks its devices."""
    budgets = resolve_budgets(cfg)
    if cfg.mode == "run":
        check_budgeted_devices(cfg, budgets)
    return budgets
