"""The big-model inference engine: a library on its own (it never imports Hydra or the job layer).

Empty models (:mod:`.empty`), byte accounting (:mod:`.sizes`), budgets (:mod:`.devices`), structure facts (:mod:`.model_info`),
the planner (:mod:`.planner`) and its :class:`DeviceMap`, checkpoint readers
(:mod:`.checkpoints`), offload folders (:mod:`.store`), the loader (:mod:`.loading`) and
the dispatcher with its hooks (:mod:`.dispatch`, :mod:`.hooks`, :mod:`.local_units`) and the
execution policy of offloaded units (:mod:`.execution`, with the speeds it weighs in :mod:`.rates`),
and the forward's own memory (:mod:`.working_memory`).
"""

from bigjob.engine.checkpoints.checkpoint import Checkpoint
from bigjob.engine.checkpoints.opening import open_checkpoint
from bigjob.engine.plan.device_map import DeviceMap, PlanSummary, check_device_map
from bigjob.engine.plan.devices import get_max_memory, parse_size
from bigjob.engine.run.dispatch import (
    DispatchInfo,
    cpu_offload,
    disk_offload,
    dispatch_model,
    execution_tokens,
    get_dispatch_info,
    load_checkpoint_and_dispatch,
    remove_dispatch,
)
from bigjob.engine.plan.empty import init_empty_weights, init_on_device
from bigjob.engine.run.execution import ExecutionPlan, ExecutionRates, measure_rates, plan_execution
from bigjob.engine.run.loading import load_checkpoint_in_model
from bigjob.engine.plan.model_info import find_tied_parameters, get_max_layer_size
from bigjob.engine.plan.planner import get_balanced_memory, infer_auto_device_map
from bigjob.engine.plan.sizes import compute_module_sizes
from bigjob.engine.plan.working_memory import estimate_working_memory

__all__ = [
    "Checkpoint",
    "DeviceMap",
    "DispatchInfo",
    "ExecutionPlan",
    "ExecutionRates",
    "PlanSummary",
    "check_device_map",
    "compute_module_sizes",
    "cpu_offload",
    "disk_offload",
    "estimate_working_memory",
    "dispatch_model",
    "execution_tokens",
    "find_tied_parameters",
    "get_balanced_memory",
    "get_dispatch_info",
    "get_max_layer_size",
    "get_max_memory",
    "infer_auto_device_map",
    "init_empty_weights",
    "init_on_device",
    "load_checkpoint_and_dispatch",
    "load_checkpoint_in_model",
    "measure_rates",
    "open_checkpoint",
    "parse_size",
    "plan_execution",
    "remove_dispatch",
]
