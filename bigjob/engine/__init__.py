"""The big-model inference engine: a library on its own (it never imports Hydra or the job layer).

Four sub-packages, in the order a model goes through them:

* :mod:`.plan`: what a model weighs and where each part goes, before any weight is read.
  Empty models (:mod:`.plan.empty`), dtypes and byte accounting (:mod:`.plan.dtypes`,
  :mod:`.plan.module_tree`, :mod:`.plan.byte_counts`, :mod:`.plan.inventory`), budgets
  (:mod:`.plan.devices`, :mod:`.plan.balance`), structure facts (:mod:`.plan.model_info`), the planner
  (:mod:`.plan.planner`, :mod:`.plan.fill`, :mod:`.plan.reserve`, :mod:`.plan.budget_fallback`; any
  ``device_map`` argument resolved in :mod:`.plan.resolution`) and its :class:`DeviceMap`
  (:mod:`.plan.device_map`), the forward's own memory (:mod:`.plan.working_memory`), and which
  weights offload compression stores quantized, in how many bytes (:mod:`.plan.compression`).
* :mod:`.checkpoints`: checkpoint readers and the safetensors writer; the choice of file,
  format and shards (:mod:`.checkpoints.opening`) and the comparison of keys (:mod:`.checkpoints.keys`).
* :mod:`.tiers`: where offloaded weights live and how their bytes come back: offload folders
  (:mod:`.tiers.store`, :mod:`.tiers.checksums`), mapped pages (:mod:`.tiers.pages`, :mod:`.tiers.folios`),
  direct reads (:mod:`.tiers.direct`), pinned buffers (:mod:`.tiers.pinned`), the files
  weights are views of (:mod:`.tiers.sources`), and int8/int4 weights (:mod:`.tiers.quantize`,
  stored as parts by :mod:`.tiers.compressed_store`).
* :mod:`.run`: the loader (:mod:`.run.loading`, with its key checks in :mod:`.run.key_checks`) and
  the dispatcher (:mod:`.run.dispatch`, its entry points in :mod:`.run.entry_points`, what it leaves
  on a model in :mod:`.run.dispatch_info`) with its hooks (:mod:`.run.hooks`, :mod:`.run.paged_units`,
  :mod:`.run.streamed_units` and their :mod:`.run.stream_buffers`, :mod:`.run.local_units`, the
  :mod:`.run.prefetcher`, and :mod:`.run.compressed_units`, which dequantizes compressed weights
  before their unit runs) and the execution policy of offloaded units (:mod:`.run.execution`, with
  the speeds it weighs in :mod:`.run.rates`).
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
