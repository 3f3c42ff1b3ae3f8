"""The runner: one job from a validated config to a run record, in the order it happens.

:func:`run_job` reads top to bottom as the steps of a job:

0. check the config, the run folder and the inputs (nothing touches the cache before this);
1. build the model under empty init (no memory);
2. fingerprint the plan's inputs;
3. take the device map from the cache, or compute and store it;
4. choose the offload folder (the cache's registry, locked so concurrent jobs build it once,
   and locked against pruning, with the demo checkpoint, until the job ends);
5. load the checkpoint and dispatch the model through the engine;
6. run the task batch by batch, appending results with a progress marker (resumable);
7. write the run record (``metrics.json``, ``device_map.json``) atomically;
   then, with ``cache.max_size``, prune other jobs' folders.

The CLI prints :meth:`JobReport.summary` (step 8).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib
import json
import logging
import os
import platform
import re
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from bigjob.errors import BigJobError, BudgetError, CheckpointError, ConfigError, JobError, OffloadError
from bigjob.job.cache import JobCache
from bigjob.job.cache_folder import default_cache_dir, make_private_dirs
from bigjob.job.cache_locks import gate_lock, use_lock
from bigjob.job.data import check_pad_id, load_samples, make_batches
from bigjob.job.fingerprint import (
    OffloadInputs,
    PlanInputs,
    job_key,
    offload_fingerprint,
    plan_fingerprint,
    tensor_signature,
    working_memory_key,
)
from bigjob.job.half_on_cpu import warn_if_slow
from bigjob.job.mapped_files import exit_on_sigbus
from bigjob.job.progress import ResultWriter
from bigjob.job.prune import prune, touch
from bigjob.job.report import DEVICE_MAP_NAME, JobReport, MemorySampler, atomic_write_text, cuda_peaks, percentile, read_report, versions
from bigjob.job.schema import JobConfig, budget_overrides, rate_overrides, validate
from bigjob.job.task_registry import build_task
from bigjob.job.text import TokenizerRef, check_context
from bigjob.models.context import model_context_length

__all__ = ["KILL_AFTER_ENV", "build_empty_model", "job_identity", "resolve_budgets", "run_job"]

logger = logging.getLogger(__name__)

DEMO_TARGET = "bigjob.models.demo.DemoTransformer"
# Budgets the user left to the device's free memory are rounded down to this, so that
# small changes in free memory between runs keep the same plan (and its cache entry).
AUTO_BUDGET_QUANTUM = 256 * 2**20
# Testing hook: SIGKILL this process right after that many batches of this session.
KILL_AFTER_ENV = "BIGJOB_KILL_AFTER_BATCHES"
# How long a job's pruning (cache.max_size) waits for other jobs choosing their folders.
PRUNE_WAIT_S = 60.0


# --------------------------------------------------------------------------- step helpers


def _in_config_terms(message: str) -> str:
    """An engine message with the engine's argument names replaced by the config keys that set them.

    >>> _in_config_terms("raise max_memory['cuda:0'] or allow disk offload (max_memory['disk'] > 0)")
    'raise placement.max_memory.gpu0 or allow disk offload (placement.max_memory.disk > 0)'
    """
    message = re.sub(r"max_memory\[['\"]?cuda:(\d+)['\"]?\]", r"placement.max_memory.gpu\1", message)
    message = re.sub(r"max_memory\[['\"]?(\w+)['\"]?\]", r"placement.max_memory.\1", message)
    message = re.sub(r"(?<![\w.])(max_memory|prefetch|working_memory)\b", r"placement.\1", message)
    message = message.replace("run smaller batches", "lower data.batch_size")
    return message.replace("`checkpoint`", "checkpoint.path").replace("strict=False", "checkpoint.strict=false")


def import_target(target: str, key: str = "model._target_") -> Any:
    """The object ``package.module.Name`` names, or a ConfigError naming ``key``."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(f"{key}={target!r} is not a dotted import path such as 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"{key}={target!r} cannot be imported ({err}); set {key} to an importable class or factory") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}={target!r}: module '{module_name}' has no attribute '{attr}'") from None


def build_empty_model(cfg: JobConfig) -> nn.Module:
    """Step 1: ``model._target_(**model.kwargs)`` (and ``path=model.path`` when set) with parameters on the meta device."""
    from bigjob.engine.plan.empty import init_empty_weights

    factory = import_target(cfg.model._target_)
    if not callable(factory):
        raise ConfigError(f"model._target_={cfg.model._target_!r} is not callable; name an nn.Module class or factory")
    kwargs = dict(cfg.model.kwargs)
    if cfg.model.path is not None:
        kwargs["path"] = cfg.model.path  # a model folder (model=hf)
    try:
        with init_empty_weights():
            model = factory(**kwargs)
    except BigJobError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model._target_={cfg.model._target_!r} rejected model.kwargs {kwargs}: {err}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg.model._target_!r} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def _vocab_size(model: nn.Module) -> int | None:
    """The size of the model's first embedding table: the id range inputs must respect."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings
    return None


def resolve_budgets(cfg: JobConfig) -> dict[str, int]:
    """Budgets in bytes per canonical device; unset devices get free memory rounded down."""
    from bigjob.engine.plan.devices import DISK, get_max_memory, normalize_device

    user = budget_overrides(cfg.placement.max_memory)
    try:
        budgets = get_max_memory(user)
    except BudgetError as err:
        raise BudgetError(_in_config_terms(str(err))) from None
    named = {normalize_device(k) for k in user}
    for device, size in budgets.items():
        if device not in named and device != DISK:
            budgets[device] = size // AUTO_BUDGET_QUANTUM * AUTO_BUDGET_QUANTUM
    return budgets


def _check_budgeted_devices(cfg: JobConfig, budgets: Mapping[str, int]) -> None:
    """A run needs every device it budgets; names the ``placement.max_memory`` key of one this machine lacks."""
    from bigjob.engine.plan.devices import normalize_device
    from bigjob.engine.run.loading import check_devices
    from bigjob.errors import DeviceError

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


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "checkpoint", "auto") else getattr(torch, name)


def _dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _hf_model_dir(cfg: JobConfig) -> Any:
    """The Transformers model folder of a ``model=hf`` job (its config.json read by Transformers), else None."""
    from bigjob.models.hf import HF_TARGET
    from bigjob.models.hf_folder import load_config, open_model_dir

    if cfg.model._target_ != HF_TARGET:
        return None
    if not cfg.model.path:
        raise ConfigError("model=hf needs model.path: the local folder holding the model's config.json and weights")
    model_dir = open_model_dir(cfg.model.path, key="model.path")
    load_config(model_dir, key="model.path")  # an unknown model type fails here, naming model.path
    return model_dir


def _resolve_hf(cfg: JobConfig, model: nn.Module) -> JobConfig:
    """A ``model=hf`` job with its automatic values made explicit: no-split classes from the model class."""
    from bigjob.models.hf_planning import no_split_classes

    if cfg.model.no_split_module_classes or cfg.placement.strategy == "explicit":
        return cfg
    names = no_split_classes(model, key="model.no_split_module_classes")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, no_split_module_classes=names))


def _ensure_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".bigjob-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise JobError(
            f"output folder {str(run_dir)!r} is not writable ({err.strerror}); set hydra.run.dir (or hydra.sweep.dir) to a writable folder"
        ) from None


def _in_cache(folder: Path, cache_root: Path) -> bool:
    """Whether ``folder`` is a folder of the cache at ``cache_root`` (a moved cache's registry names another place)."""
    offload = (Path(cache_root).expanduser().absolute() / "offload").resolve()
    try:
        return folder.is_dir() and folder.resolve().is_relative_to(offload)
    except OSError:
        return False


def check_run_folder(run_dir: Path, key: str) -> None:
    """Refuses a run folder holding another job's results (key ``key`` is this job's) before anything in it is replaced."""
    progress = ResultWriter(run_dir, key)
    marker = progress._read_progress()
    earlier = read_report(run_dir)
    if (marker is not None and marker.get("job_key") != key) or (
        earlier is not None and earlier.status == "completed" and earlier.job_key != key
    ):
        raise JobError(
            f"output folder {str(run_dir)!r} holds the results of a job with another config; set hydra.run.dir "
            "(or hydra.sweep.dir) to a new folder, or delete that one"
        )


def _check_offload_folder(cfg: JobConfig) -> None:
    """An explicit ``placement.offload_folder`` must be creatable and writable (nothing is created here)."""
    if not cfg.placement.offload_folder:
        return
    folder = Path(cfg.placement.offload_folder).expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OffloadError(
            f"placement.offload_folder '{cfg.placement.offload_folder}' cannot be written ('{existing}' is not a "
            "writable folder); set placement.offload_folder to a writable folder, or to null to use the cache's"
        )


def _checkpoint_location(cfg: JobConfig, cache_root: Path | None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint path (None: the demo one, not made yet) and, for the demo, its identity."""
    if cfg.checkpoint.source == "path":
        path = Path(str(cfg.checkpoint.path)).expanduser()
        if not path.exists():
            raise CheckpointError(f"checkpoint.path '{path}' does not exist; set checkpoint.path to a checkpoint file, index or folder")
        return path.absolute(), None
    if cfg.model._target_ != DEMO_TARGET:
        raise ConfigError(
            f"checkpoint.source=demo makes the demo model's checkpoint, but model._target_ is "
            f"{cfg.model._target_!r}; use checkpoint=path checkpoint.path=<this model's weights>"
        )
    from bigjob.models.demo import _marker

    # The demo checkpoint's bytes are a pure function of its marker: that is its identity.
    return None, {"format": "bigjob-demo", "marker": _marker(dict(cfg.model.kwargs), cfg.checkpoint.demo_seed, 4)}


def _checkpoint_identity(
    path: Path, cfg: JobConfig, model: nn.Module | None, dtype: torch.dtype | None, special_dtypes: dict[str, Any]
) -> dict[str, Any]:
    """The checkpoint's identity; with ``model``, first checks that its tensors fit the model (headers only)."""
    from bigjob.engine.checkpoints.opening import open_checkpoint
    from bigjob.engine.run.key_checks import check_checkpoint

    try:
        with open_checkpoint(path) as checkpoint:
            if model is not None:
                check_checkpoint(model, checkpoint, dtype, special_dtypes or None, strict=cfg.checkpoint.strict)
            return checkpoint.identity(content_hash=cfg.checkpoint.content_hash)
    except CheckpointError as err:  # UnsafeCheckpointError stays itself
        raise type(err)(f"checkpoint.path '{path}': {_in_config_terms(str(err))}") from None


def _explicit_map(cfg: JobConfig, model: nn.Module) -> Any:
    from bigjob.engine.plan.device_map import DeviceMap, check_device_map

    source = cfg.placement.device_map
    if isinstance(source, str):
        try:
            source = json.loads(Path(source).expanduser().read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"placement.device_map '{cfg.placement.device_map}' cannot be read as a device map JSON ({err})") from None
    if not isinstance(source, Mapping):
        raise ConfigError(f"placement.device_map must be a map {{module: device}} or a JSON path, got {type(source).__name__}")
    try:
        device_map = DeviceMap.from_json(dict(source))
        check_device_map(model, device_map)
    except ConfigError as err:  # DeviceMapError: the class stays, the message names the key
        raise type(err)(f"placement.device_map {cfg.placement.device_map!r}: {err}") from None
    return device_map


def _planned_map(
    model: nn.Module,
    cfg: JobConfig,
    inputs: PlanInputs,
    plan_key: str,
    dtype: torch.dtype | None,
    special_dtypes: dict[str, Any],
    cache: JobCache | None,
) -> tuple[Any, bool | None]:
    """Step 3: ``(device map, plan cache hit)``, computed at most once per key across processes."""
    from bigjob.engine.plan.device_map import DeviceMap
    from bigjob.engine.plan.resolution import infer_auto_device_map

    def compute() -> dict[str, Any]:
        try:
            planned = infer_auto_device_map(
                model,
                max_memory=dict(inputs.budgets),
                no_split_module_classes=list(cfg.model.no_split_module_classes),
                dtype=dtype,
                special_dtypes=special_dtypes or None,
                strategy=cfg.placement.strategy,
                prefetch=cfg.placement.prefetch,
                working_memory=inputs.working_memory, strict_budget=inputs.strict_budget,
            ).to_dict()
        except BudgetError as err:
            raise type(err)(_in_config_terms(str(err))) from None
        return {"kind": "plan", "device_map": planned["device_map"], "summary": planned["plan"], "inputs": inputs.describe()}

    hit: bool | None = None
    if cache is not None:
        entry, hit = cache.compute_once(f"plan:{plan_key}", compute)
    else:
        entry = compute()
    return DeviceMap.from_json({"device_map": entry["device_map"], "plan": entry.get("summary")}), hit


def _describe_forward(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A forward call as JSON: tensors by shape and dtype, other values as they are."""

    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return {"shape": list(value.shape), "dtype": str(value.dtype)}
        return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)

    return {"args": [one(a) for a in args], "kwargs": {k: one(v) for k, v in sorted(kwargs.items())}}


def _working_memory(
    cfg: JobConfig, model: nn.Module, task: Any, batches: list[Any], dtype: torch.dtype | None, inputs: PlanInputs, cache: JobCache | None
) -> int:
    """Bytes ``placement.working_memory`` keeps free: a size as given, or ``auto``'s estimate for the largest batch.

    The estimate (a traced forward: 0.25 s for a 24-layer decoder) is cached under the model, its
    tensors, the dtypes, the forward's inputs and the library versions that trace it.
    """
    from bigjob.engine.plan.devices import format_size, parse_size
    from bigjob.engine.plan.working_memory import ESTIMATE_VERSION, estimate_working_memory

    setting = cfg.placement.working_memory
    if setting is None:
        return 0
    if setting != "auto":
        return parse_size(setting, key="placement.working_memory")
    if not batches:
        return 0
    shape = max((tuple(b.input_ids.shape) for b in batches), key=lambda rows_tokens: rows_tokens[0] * rows_tokens[1])
    args, kwargs = task.forward_for(model, shape)
    forward = {"task": task.name, **_describe_forward(args, kwargs)}

    def compute() -> dict[str, Any]:
        try:
            estimate = estimate_working_memory(model, *args, dtype=dtype, **kwargs)
        except ConfigError as err:
            raise ConfigError(f"placement.working_memory=auto: {err} (placement.working_memory=200MiB, say)") from None
        return {"kind": "working", "bytes": estimate, "forward": forward}

    if cache is None:
        entry, hit = compute(), False
    else:
        described = inputs.describe()
        identity = {name: described[name] for name in ("model_class", "model_kwargs", "tensors", "dtype", "special_dtypes")}
        traced_by = {**versions(), "estimate": ESTIMATE_VERSION}
        if "transformers" in sys.modules:  # the model code that is traced
            traced_by["transformers"] = getattr(sys.modules["transformers"], "__version__", "unknown")
        key = working_memory_key({**identity, "forward": forward, "versions": traced_by})
        entry, hit = cache.compute_once(f"working:{key}", compute)
    logger.info(
        "working memory of the largest batch %s: %s (placement.working_memory=auto, %s)",
        shape, format_size(entry["bytes"]), "from the cache" if hit else "estimated",
    )
    return int(entry["bytes"])


def _job_key(cfg: JobConfig, model_dir: Any) -> str:
    return job_key({**dataclasses.asdict(cfg), **({"model_dir": model_dir.identity()} if model_dir else {})})


def job_identity(cfg: JobConfig) -> str:
    """The job's key (``JobReport.job_key``): its resolved config, and a Transformers folder's identity."""
    return _job_key(cfg, _hf_model_dir(cfg))


def _reuse_completed(run_dir: Path, key: str, cache: JobCache | None, multirun: bool) -> JobReport | None:
    """A completed report for this job in ``run_dir``, or (in sweeps) copied from an earlier run."""
    own = read_report(run_dir)
    if own is not None and own.status == "completed" and own.job_key == key:
        logger.info("run folder %s already holds this completed job; nothing to do", run_dir)
        return own
    if not multirun or cache is None:
        return None
    entry = cache.get(f"run:{key}")
    if entry is None:
        return None
    earlier = read_report(entry["run_dir"])
    if earlier is None or earlier.status != "completed" or earlier.job_key != key:
        return None
    logger.info("skipping: this job already completed with the same config in %s", entry["run_dir"])
    earlier_map = Path(entry["run_dir"]) / DEVICE_MAP_NAME
    if earlier_map.exists():
        shutil.copyfile(earlier_map, run_dir / DEVICE_MAP_NAME)
    report = dataclasses.replace(earlier, run_dir=str(run_dir), reused_from=entry["run_dir"])
    report.write()
    return report


# --------------------------------------------------------------------------- the job


def run_job(cfg: JobConfig, run_dir: str | os.PathLike[str], multirun: bool = False) -> JobReport:
    """Runs (or with ``mode=plan`` only plans) one job and writes its record into ``run_dir``."""
    from bigjob.engine.plan.devices import device_inventory
    from bigjob.engine.plan.planner import PLANNER_VERSION

    started = time.time()
    run_dir = Path(run_dir).absolute()

    # 0. Everything that can be wrong with the input is found before the cache is opened.
    validate(cfg)
    _ensure_writable(run_dir)
    _check_offload_folder(cfg)
    model_dir = _hf_model_dir(cfg)  # a Transformers folder: its config.json is part of the job's identity
    key = _job_key(cfg, model_dir)
    check_run_folder(run_dir, key)
    report = JobReport(status="running", run_dir=str(run_dir), job_key=key, mode=cfg.mode, task=cfg.task.name, started_at=started)
    model = build_empty_model(cfg)  # 1.
    report.model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    tokenizer = None
    if model_dir is not None:
        cfg = _resolve_hf(cfg, model)
        tokenizer = TokenizerRef(model_dir.path, key="model.path")
    batches = []
    if cfg.mode == "run" or cfg.placement.working_memory == "auto":  # auto sizes the plan from the batches
        samples = load_samples(cfg.data, _vocab_size(model), tokenizer)
        reserve = cfg.task.max_new_tokens if cfg.task.name == "generate" else 0
        check_context(samples, model_context_length(model), reserve, synthetic=cfg.data.source == "synthetic")
        check_pad_id(cfg.data.pad_id, _vocab_size(model))
        batches = make_batches(samples, cfg.data.batch_size, cfg.data.pad_id)
    task = build_task(cfg.task, tokenizer)
    task.check(model)
    budgets = resolve_budgets(cfg)
    if cfg.mode == "run":  # a plan may target another machine; a run needs the devices here
        _check_budgeted_devices(cfg, budgets)
    dtype = _dtype(cfg.dtype.name)
    special_dtypes = {name: _dtype(value) for name, value in cfg.model.special_dtypes.items()}
    if model_dir is not None:
        from bigjob.models.hf_planning import dtype_exceptions, resolve_dtype

        dtype = resolve_dtype(cfg.dtype.name if cfg.dtype.name == "auto" else dtype, model_dir, key="dtype.name")
        special_dtypes = {**dtype_exceptions(model, dtype), **special_dtypes}
    cache_root = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else default_cache_dir()
    checkpoint_path, identity = _checkpoint_location(cfg, cache_root)
    if identity is None:
        assert checkpoint_path is not None
        # Transformers folders skip the key check here: load_and_dispatch knows which keys they may ignore.
        identity = _checkpoint_identity(checkpoint_path, cfg, model if model_dir is None else None, dtype, special_dtypes)
    explicit = _explicit_map(cfg, model) if cfg.placement.strategy == "explicit" else None

    cache = JobCache(cache_root) if cfg.cache.enabled else None
    uses = contextlib.ExitStack()  # the cache folders this job uses, locked against pruning until it ends
    try:
        reused = _reuse_completed(run_dir, key, cache, multirun) if cfg.skip_completed and cfg.mode == "run" else None
        if reused is not None:
            return reused
        with MemorySampler() as memory:
            report.start_rss_bytes, report.start_anon_bytes = memory.peak_rss, memory.peak_anon
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()

            # 2. Fingerprint of everything the plan depends on.
            devices = device_inventory()
            tensors = tensor_signature(model)
            model_kwargs = {"_target_": cfg.model._target_, **dict(cfg.model.kwargs)}
            if model_dir is not None:
                model_kwargs["model_dir"] = model_dir.identity()  # config.json's hash: another config, another plan
            inputs = PlanInputs(
                model_class=report.model_class,
                model_kwargs=model_kwargs,
                tensors=tensors,
                dtype=_dtype_name(dtype),
                special_dtypes={name: str(_dtype_name(value)) for name, value in special_dtypes.items()},
                budgets=budgets,
                strategy=cfg.placement.strategy,
                no_split=list(cfg.model.no_split_module_classes),
                prefetch=cfg.placement.prefetch, strict_budget=cfg.placement.strict_budget,
                devices=devices,
                checkpoint=identity,
                planner_version=PLANNER_VERSION,
            )
            if cfg.placement.working_memory is not None:  # validate() refuses it with an explicit map
                working = _working_memory(cfg, model, task, batches, dtype, inputs, cache)
                inputs = dataclasses.replace(inputs, working_memory=working)
            report.plan_key = plan_fingerprint(inputs)

            # 3. The device map: explicit, cached, or computed once and stored.
            t0 = time.perf_counter()
            if explicit is not None:
                device_map = explicit
            else:
                device_map, report.plan_cache_hit = _planned_map(model, cfg, inputs, report.plan_key, dtype, special_dtypes, cache)
            report.plan_seconds = time.perf_counter() - t0
            if device_map.summary is not None:
                report.planned_bytes = dict(device_map.summary.planned_bytes)
                report.budgets = dict(device_map.summary.budgets)
                report.user_budgets = dict(budgets)
                report.main_device = device_map.summary.main_device
                report.working_memory_bytes = device_map.summary.working_memory
            atomic_write_text(run_dir / DEVICE_MAP_NAME, device_map.to_json() + "\n")
            report.checkpoint = identity
            report.devices = devices
            report.versions = versions()
            if cfg.mode == "plan":
                report.status = "planned"
                report.outputs = {"device_map": str(run_dir / DEVICE_MAP_NAME), "record": str(run_dir / "metrics.json")}
                logger.info("plan %s in %.3f s", "from the cache" if report.plan_cache_hit else "computed", report.plan_seconds)
                return _finish(report, memory, started)

            # 4. Where converted disk-tier weights go: the registry folder for their fingerprint.
            disk_modules = [name for name, device in device_map.items() if device == "disk"]
            offload_inputs = OffloadInputs(identity, tensors, inputs.dtype, dict(inputs.special_dtypes), disk_modules, cfg.placement.offload_buffers)
            offload_key = offload_fingerprint(offload_inputs)
            # The same, whatever is on disk: folders of one family differ only in which modules they hold.
            offload_family = offload_fingerprint(dataclasses.replace(offload_inputs, disk_modules=[]))
            # Chosen under the cache's gate and locked until the job ends: pruning never removes them meanwhile.
            demo_folder = None
            registry = cache is not None and bool(disk_modules) and not cfg.placement.offload_folder
            with gate_lock(cache_root) if checkpoint_path is None or registry else contextlib.nullcontext():
                if checkpoint_path is None:
                    from bigjob.models.demo import demo_checkpoint_folder

                    demo_folder = demo_checkpoint_folder(cache_root / "checkpoints", dict(cfg.model.kwargs), cfg.checkpoint.demo_seed)
                    uses.enter_context(use_lock(cache_root, demo_folder))
                if cfg.placement.offload_folder:
                    offload_folder = Path(cfg.placement.offload_folder).expanduser().absolute()
                elif cache is not None:
                    offload_folder = cache.offload_dir(offload_key)
                    if disk_modules:
                        served = cache.get(f"offload:{offload_key}")
                        if served is not None and _in_cache(Path(str(served.get("path", ""))), cache_root):
                            offload_folder = Path(served["path"]).parent  # served before, perhaps by a larger folder
                        else:
                            # Not built for this plan yet: a plan with more on disk (a smaller budget of a
                            # sweep) may have built a folder that holds these tensors already.
                            holding = cache.offload_holding(offload_family, disk_modules)
                            offload_folder = holding if holding is not None and _in_cache(holding, cache_root) else offload_folder
                    if registry:
                        uses.enter_context(use_lock(cache_root, offload_folder))
                else:
                    offload_folder = run_dir / "offload"
            if demo_folder is not None:
                from bigjob.models.demo import make_demo_checkpoint

                checkpoint_path = make_demo_checkpoint(make_private_dirs(demo_folder.parent), dict(cfg.model.kwargs), cfg.checkpoint.demo_seed)
                touch(checkpoint_path)

            # 5. Load and dispatch; the lock makes concurrent jobs build a shared folder once.
            model = _load(model, checkpoint_path, device_map, dtype, special_dtypes, offload_folder, cfg, cache, offload_key, disk_modules, model_dir is not None)
            info = _engine_dispatch()[1](model)
            if info is None:
                raise JobError("the engine returned a model without dispatch information; this is a bug in bigjob")
            uses.enter_context(exit_on_sigbus(info.sources, run_dir))  # a mapped file cut short mid-forward: one line
            report.main_device = info.main_device
            warn_if_slow(_dtype_name(dtype), info.main_device)  # bf16/fp16 emulated on CPUs without the instructions
            report.load_seconds = info.load_seconds
            report.bytes_per_tier = dict(info.bytes_per_tier)
            report.offload_folder = info.offload_folder
            report.offload_cache_hit = info.offload_reused
            if registry:
                touch(offload_folder)  # its last use, for pruning
            if cache is not None and info.offload_folder and not cfg.placement.offload_folder:
                cache.set(
                    f"offload:{offload_key}",
                    {"kind": "offload", "path": str(info.offload_folder), "checkpoint": identity, "dtype": inputs.dtype,
                     "disk_modules": sorted(disk_modules), "family": offload_family, "model_class": report.model_class,
                     "created": time.time()},
                )

            # 6. Batches, resumable.
            writer = ResultWriter(run_dir, key)
            report.resumed_from_batch = start = writer.resume()
            kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
            quiet = cfg.quiet or not sys.stderr.isatty()
            loop_start = time.perf_counter()
            for batch in tqdm(batches[start:], initial=start, total=len(batches), disable=quiet, desc=task.name, unit="batch"):
                t = time.perf_counter()
                result = task.run(model, batch, info.main_device)
                writer.append(batch.index, result, time.perf_counter() - t)
                if report.first_batch_seconds is None:
                    report.first_batch_seconds = time.time() - started
                if kill_after and writer.batches_done - start >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            loop_seconds = time.perf_counter() - loop_start

            # 7. The record.
            session = batches[start:]
            report.batches = len(batches)
            report.samples = sum(len(b.sample_ids) for b in batches)
            report.tokens = sum(b.num_tokens for b in batches)
            report.batch_latency_p50_s = percentile(writer.batch_seconds, 50)
            report.batch_latency_p90_s = percentile(writer.batch_seconds, 90)
            if session and loop_seconds > 0:
                report.samples_per_s = sum(len(b.sample_ids) for b in session) / loop_seconds
                report.tokens_per_s = sum(b.num_tokens for b in session) / loop_seconds
            report.task_metrics = task.metrics()
            schedule = getattr(info, "schedule", None)
            if schedule is not None and any(schedule.unit_reads.values()):
                report.disk_unit_reads = dict(schedule.unit_reads)
            report.outputs = {**writer.outputs(), "record": str(run_dir / "metrics.json")}
            report.status = "completed"
            info.detach()  # stop the prefetch thread and drop the hooks: the next sweep job starts clean
            del model, info
            gc.collect()
            report = _finish(report, memory, started)
        if cache is not None:
            cache.set(f"run:{key}", {"kind": "run", "run_dir": str(run_dir), "finished": report.finished_at})
            if cfg.cache.max_size is not None:
                _prune_to(cache, cfg.cache.max_size)  # this job's own folders are still locked: they stay
        return report
    finally:
        uses.close()
        if cache is not None:
            cache.close()


def _prune_to(cache: JobCache, max_size: str | int, room: int = 0) -> None:
    """``cache.max_size``: removes the least recently used folders of other jobs until the cache fits,
    with ``room`` bytes to spare (an offload folder about to be built).

    Pruning never fails a job: what goes wrong is a warning.
    """
    from bigjob.engine.plan.devices import format_size, parse_size

    limit = max(0, parse_size(max_size, key="cache.max_size") - room)
    what = f"cache.max_size={max_size}" + (f", {format_size(room)} kept free for the offload folder to build" if room else "")
    try:
        result = prune(cache, max_size=limit, wait=PRUNE_WAIT_S)
    except BigJobError as err:
        logger.warning("%s: the cache was not pruned (%s)", what, err)
        return
    if result.removed:
        logger.info(
            "%s: removed %d least recently used folders (%s); the cache holds %s",
            what, len(result.removed), format_size(result.freed), format_size(result.size_after),
        )
    for artifact, error in result.failed:
        logger.warning("%s: could not remove %s (%s)", what, artifact.path, error)
    if result.size_after > limit:
        logger.warning(
            "the cache holds %s, more than %s allows (%s): %s",
            format_size(result.size_after), what, format_size(limit),
            f"{len(result.in_use)} folders in use by running jobs (this one's included) were kept" if result.in_use
            else "what is left is plans, registry entries and locks; `bigjob-cache clear` removes them",
        )


def _load(
    model: nn.Module,
    checkpoint_path: Path,
    device_map: Any,
    dtype: torch.dtype | None,
    special_dtypes: dict[str, Any],
    offload_folder: Path,
    cfg: JobConfig,
    cache: JobCache | None,
    offload_key: str,
    disk_modules: list[str],
    transformers_model: bool = False,
) -> nn.Module:
    load_checkpoint_and_dispatch = _engine_dispatch()[0]
    if transformers_model:
        from bigjob.models.hf import load_and_dispatch

        load_checkpoint_and_dispatch = load_and_dispatch  # the engine's, minus the keys Transformers ignores too

    def load() -> nn.Module:
        return load_checkpoint_and_dispatch(
            model,
            str(checkpoint_path),
            device_map=device_map,
            dtype=dtype,
            special_dtypes=special_dtypes or None,
            offload_folder=str(offload_folder) if disk_modules else None,
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
        )

    if disk_modules:
        make_private_dirs(offload_folder.parent)
    if cache is not None and disk_modules:
        from bigjob.engine.tiers.store import before_offload_build

        max_size = cfg.cache.max_size
        # cache.max_size holds while the folder is built too: room is made first (a full disk fails the build).
        room = before_offload_build(lambda nbytes: _prune_to(cache, max_size, nbytes)) if max_size is not None else contextlib.nullcontext()
        with cache.lock(f"offload:{offload_key}"), room:
            return load().eval()
    return load().eval()


def _engine_dispatch() -> tuple[Any, Any]:
    """The engine's ``(load_checkpoint_and_dispatch, get_dispatch_info)``."""
    from bigjob.engine.run.dispatch_info import get_dispatch_info
    from bigjob.engine.run.entry_points import load_checkpoint_and_dispatch
    return load_checkpoint_and_dispatch, get_dispatch_info


def _finish(report: JobReport, memory: MemorySampler, started: float) -> JobReport:
    memory.sample()
    report.peak_rss_bytes = memory.peak_rss
    report.peak_anon_bytes = memory.peak_anon
    report.peak_cuda_allocated_bytes = cuda_peaks()
    report.finished_at = time.time()
    report.wall_seconds = report.finished_at - started
    report.host, report.pid, report.parent_pid = platform.node(), os.getpid(), os.getppid()
    report.write()
    return report
