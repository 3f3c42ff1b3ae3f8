"""Step 0 of a job: everything that can be wrong with its input, found before the cache is opened.

:func:`check_job` validates the config, checks the run folder (writable, holding no other
job's results) and an explicit offload folder, builds the empty model (step 1), reads and
checks the samples against it, builds the task, resolves the budgets and dtypes, and
identifies the checkpoint (its tensors checked against the model, headers only). What it
found is a :class:`CheckedJob`, which every later step reads; nothing here writes to the
cache, so a bad input leaves no entry behind.

>>> import tempfile
>>> from bigjob.job.schema import JobConfig
>>> cfg = JobConfig(mode="plan")
>>> cfg.model.kwargs = {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_ff": 32, "vocab_size": 64}
>>> job = check_job(cfg, Path(tempfile.mkdtemp()))
>>> job.model_class, job.batches, job.checkpoint.path  # a plan needs no batches; the demo checkpoint is made later
('bigjob.models.demo.DemoTransformer', [], None)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from bigjob.errors import OffloadError
from bigjob.job.budgets import job_budgets
from bigjob.job.cache_folder import default_cache_dir
from bigjob.job.checkpoint_source import CheckpointSource, locate_checkpoint
from bigjob.job.data import Batch, check_pad_id, load_samples, make_batches
from bigjob.job.dtypes import JobDtypes, resolve_dtypes
from bigjob.job.empty_model import build_job_model, hf_model_dir, vocab_size
from bigjob.job.explicit_map import read_explicit_map
from bigjob.job.identity import job_key_for
from bigjob.job.run_folder import check_run_folder, ensure_writable
from bigjob.job.schema import JobConfig, validate
from bigjob.job.task_registry import build_task
from bigjob.job.tasks import Task
from bigjob.job.text import TokenizerRef, check_context
from bigjob.models.context import model_context_length

if TYPE_CHECKING:
    from bigjob.engine.plan.device_map import DeviceMap

__all__ = ["CheckedJob", "check_job"]


@dataclass(frozen=True)
class CheckedJob:
    """A job whose inputs all passed their checks: what the later steps read."""

    cfg: JobConfig  # model=hf: its automatic values made explicit
    run_dir: Path  # absolute
    key: str  # the job key (JobReport.job_key)
    model_dir: Any  # a Transformers folder (bigjob.models.hf_folder.ModelDir), else None
    model: nn.Module  # empty: parameters on the meta device
    model_class: str  # module.QualName of the model
    batches: list[Batch]  # empty for mode=plan, unless placement.working_memory=auto sizes the plan from them
    task: Task
    budgets: dict[str, int]  # bytes per canonical device (placement.max_memory resolved)
    dtypes: JobDtypes
    checkpoint: CheckpointSource
    cache_root: Path  # cache.dir, or the default cache folder
    explicit_map: DeviceMap | None  # placement.strategy=explicit: the map the user wrote


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


def _batches(cfg: JobConfig, model: nn.Module, tokenizer: TokenizerRef | None) -> list[Batch]:
    """The samples as batches, checked against the model's vocabulary and context; none where a plan needs none."""
    if not (cfg.mode == "run" or cfg.placement.working_memory == "auto"):  # auto sizes the plan from the batches
        return []
    samples = load_samples(cfg.data, vocab_size(model), tokenizer)
    reserve = cfg.task.max_new_tokens if cfg.task.name == "generate" else 0
    check_context(samples, model_context_length(model), reserve, synthetic=cfg.data.source == "synthetic")
    check_pad_id(cfg.data.pad_id, vocab_size(model))
    return make_batches(samples, cfg.data.batch_size, cfg.data.pad_id)


def check_job(cfg: JobConfig, run_dir: Path) -> CheckedJob:
    """Steps 0 and 1: the config, the run folder ``run_dir`` (absolute) and every input checked; the empty model built."""
    validate(cfg)
    ensure_writable(run_dir)
    _check_offload_folder(cfg)
    model_dir = hf_model_dir(cfg)  # a Transformers folder: its config.json is part of the job's identity
    key = job_key_for(cfg, model_dir)
    check_run_folder(run_dir, key)
    built = build_job_model(cfg, model_dir)
    cfg, model = built.cfg, built.model
    batches = _batches(cfg, model, built.tokenizer)
    task = build_task(cfg.task, built.tokenizer)
    task.check(model)
    budgets = job_budgets(cfg)
    dtypes = resolve_dtypes(cfg, model, model_dir)
    cache_root = Path(cfg.cache.dir).expanduser() if cfg.cache.dir else default_cache_dir()
    # Transformers folders skip the key check here: load_and_dispatch knows which keys they may ignore.
    checkpoint = locate_checkpoint(cfg, dtypes, keys_of=model if model_dir is None else None)
    explicit = read_explicit_map(cfg, model) if cfg.placement.strategy == "explicit" else None
    return CheckedJob(cfg, run_dir, key, model_dir, model, built.model_class, batches, task, budgets, dtypes, checkpoint, cache_root, explicit)
