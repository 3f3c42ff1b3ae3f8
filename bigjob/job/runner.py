"""The runner: one job from a validated config to a run record, in the order it happens.

:func:`run_job` reads top to bottom as the steps of a job, each a function of its own module:

0. check the config, the run folder and the inputs; nothing touches the cache before this
   (:func:`~bigjob.job.checked_job.check_job`);
1. build the model under empty init, no memory (:mod:`bigjob.job.empty_model`, within step 0);
2. fingerprint the plan's inputs, and
3. take the device map from the cache, or compute and store it (:func:`~bigjob.job.device_plan.plan_placement`);
4. choose the offload folder (the cache's registry, locked so concurrent jobs build it once,
   and locked against pruning, with the demo checkpoint, until the job ends)
   (:func:`~bigjob.job.job_folders.choose_folders`);
5. load the checkpoint and dispatch the model through the engine (:func:`~bigjob.job.model_loading.load_job_model`);
6. run the task batch by batch, appending results with a progress marker, resumable
   (:func:`~bigjob.job.batch_loop.run_batches`);
7. write the run record (``metrics.json``, ``device_map.json``) atomically (:mod:`bigjob.job.run_record`);
   then, with ``cache.max_size``, prune other jobs' folders (:func:`~bigjob.job.cache_limit.prune_to`).

The CLI prints :meth:`JobReport.summary` (step 8).
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from pathlib import Path

from bigjob.job.batch_loop import run_batches
from bigjob.job.cache import JobCache
from bigjob.job.cache_limit import prune_to
from bigjob.job.checked_job import check_job
from bigjob.job.device_plan import plan_placement, write_device_map
from bigjob.job.job_folders import choose_folders, remember_offload
from bigjob.job.mapped_files import exit_on_sigbus
from bigjob.job.model_loading import load_job_model
from bigjob.job.report import JobReport, MemorySampler
from bigjob.job.run_folder import remember_completed, reuse_completed
from bigjob.job.run_record import finish, new_report, record_batches, record_dispatch, record_placement, start_measuring
from bigjob.job.schema import JobConfig

__all__ = ["run_job"]


def run_job(cfg: JobConfig, run_dir: str | os.PathLike[str], multirun: bool = False) -> JobReport:
    """Runs (or with ``mode=plan`` only plans) one job and writes its record into ``run_dir``."""
    started = time.time()
    job = check_job(cfg, Path(run_dir).absolute())  # 0.-1. everything that can be wrong with the input, before the cache
    cfg = job.cfg
    report = new_report(job, started)
    cache = JobCache(job.cache_root) if cfg.cache.enabled else None
    uses = contextlib.ExitStack()  # the cache folders this job uses, locked against pruning until it ends
    try:
        reused = reuse_completed(job.run_dir, job.key, cache, multirun) if cfg.skip_completed and cfg.mode == "run" else None
        if reused is not None:
            return reused
        with MemorySampler() as memory:
            start_measuring(report, memory)
            placement = plan_placement(job, cache)  # 2.-3.
            record_placement(report, job, placement)
            write_device_map(job.run_dir, placement)
            if cfg.mode == "plan":
                return finish(report, memory, started)
            folders = choose_folders(job, placement, cache, uses)  # 4.
            loaded = load_job_model(job, placement, folders, cache)  # 5.
            uses.enter_context(exit_on_sigbus(loaded.info.sources, job.run_dir))  # a mapped file cut short mid-forward: one line
            record_dispatch(report, loaded)
            remember_offload(job, placement, folders, loaded.info.offload_folder, cache)
            loop = run_batches(job, loaded, started)  # 6.
            record_batches(report, job, loop, loaded)  # 7.
            loaded.detach()
            del job, loaded  # the model and its hooks go before the last memory sample: the next sweep job starts clean
            gc.collect()
            report = finish(report, memory, started)
        if cache is not None:
            remember_completed(cache, report)
            if cfg.cache.max_size is not None:
                prune_to(cache, cfg.cache.max_size)  # this job's own folders are still locked: they stay
        return report
    finally:
        uses.close()
        if cache is not None:
            cache.close()
