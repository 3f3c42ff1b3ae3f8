"""The big-model inference engine: a library on its own (it never imports Hydra or the job layer).

Empty models (:mod:`.empty`), byte accounting (:mod:`.sizes`), budgets (:mod:`.devices`), structure facts (:mod:`.model_info`),
the planner (:mod:`.planner`) and its :class:`DeviceMap`, checkpoint readers
(:mod:`.checkpoint`), offload folders (:mod:`.store`), the loader (:mod:`.loading`, with its key checks in :mod:`.key_checks`) and
the dispatcher (:mod:`.dispatch`, its entry points in :mod:`.entry_points`, what it leaves on a model in
:mod:`.dispatch_info`) with its hooks (:mod:`.hooks`, :mod:`.paged_units`, :mod:`.streamed_units` and their
:mod:`.stream_buffers`, :mod:`.local_units`, the :mod:`.prefetcher`) and the
execution policy of offloaded units (:mod:`.execution`, with the speeds it weighs in :mod:`.rates`),
and the forward's own memory (:mod:`.working_memory`).
"""

from bigjob.engine.checkpoints.checkpoint import Checkpoint

from bigjob.engine.checkpoints.opening import open_checkpoint
from bigjob.engine.plan.device_map import DeviceMap, PlanSummary, check_device_map
from bigjob.engine.plan.devices import get_max_memory, parse_size
from bigjob.engine.run.dispatch_info import DispatchInfo, execution_tokens, get_dispatch_info, remove_dispatch
from bigjob.engine.run.entry_points import cpu_offload, disk_offload, dispatch_model, load_checkpoint_and_dispatch
from bigjob.engine.plan.empty import init_empty_weights, init_on_device
from bigjob.engine.run.execution import ExecutionPlan, ExecutionRates, measure_rates, plan_execution
from bigjob.engine.run.loading import load_checkpoint_in_model
from bigjob.engine.plan.model_info import find_tied_parameters, get_max_layer_size
from bigjob.engine.plan.balance import get_balanced_memory
from bigjob.engine.plan.resolution import infer_auto_device_map
from bigjob.engine.plan.inventory import compute_module_sizes
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
