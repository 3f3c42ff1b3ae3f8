"""Step 7 of a job: its :class:`~bigjob.job.report.JobReport` filled from what each step handed on, and written.

Each ``record_*`` function copies one step's result into the report; :func:`finish` takes
the last memory sample, stamps the time and the process, and writes ``metrics.json``
atomically. Nothing here decides anything: the report is data about the steps.

>>> import tempfile
>>> from bigjob.job.report import read_report
>>> report = JobReport(status="running", run_dir=tempfile.mkdtemp(), job_key="k", mode="plan")
>>> with MemorySampler() as memory:
...     start_measuring(report, memory)
...     report = finish(report, memory, started=time.time())
>>> read_report(report.run_dir) == report, report.peak_rss_bytes > 0
(True, True)
"""

from __future__ import annotations

import logging
import os
import platform
import time

import torch

from bigjob.job.batch_loop import BatchLoop
from bigjob.job.checked_job import CheckedJob
from bigjob.job.device_plan import Placement
from bigjob.job.model_loading import LoadedModel
from bigjob.job.report import DEVICE_MAP_NAME, METRICS_NAME, JobReport, MemorySampler, cuda_peaks, percentile, versions

__all__ = ["finish", "new_report", "record_batches", "record_dispatch", "record_placement", "start_measuring"]

logger = logging.getLogger(__name__)


def new_report(job: CheckedJob, started: float) -> JobReport:
    """The report of a job that is running (``started``: its ``time.time()`` at the start)."""
    cfg = job.cfg
    return JobReport(status="running", run_dir=str(job.run_dir), job_key=job.key, mode=cfg.mode, task=cfg.task.name,
                     started_at=started, model_class=job.model_class)


def start_measuring(report: JobReport, memory: MemorySampler) -> None:
    """Records the memory the job starts with (in a sweep, earlier jobs' shows here); resets the CUDA peaks."""
    report.start_rss_bytes, report.start_anon_bytes = memory.peak_rss, memory.peak_anon
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def record_placement(report: JobReport, job: CheckedJob, placement: Placement) -> None:
    """Steps 2-3: the plan's key, time and cache hit, what it planned per device, and the inputs it was made for."""
    report.plan_key = placement.key
    report.plan_seconds = placement.seconds
    report.plan_cache_hit = placement.cache_hit
    summary = placement.device_map.summary
    if summary is not None:
        report.planned_bytes = dict(summary.planned_bytes)
        report.budgets = dict(summary.budgets)
        report.user_budgets = dict(job.budgets)
        report.main_device = summary.main_device
        report.working_memory_bytes = summary.working_memory
    report.checkpoint = job.checkpoint.identity
    report.devices = [dict(device) for device in placement.inputs.devices]
    report.versions = versions()
    if job.cfg.mode == "plan":
        report.status = "planned"
        report.outputs = {"device_map": str(job.run_dir / DEVICE_MAP_NAME), "record": str(job.run_dir / METRICS_NAME)}
        logger.info("plan %s in %.3f s", "from the cache" if placement.cache_hit else "computed", placement.seconds)


def record_dispatch(report: JobReport, loaded: LoadedModel) -> None:
    """Step 5: where the model executes, how long loading took, the bytes per tier and the offload folder it used."""
    info = loaded.info
    report.main_device = info.main_device
    report.load_seconds = info.load_seconds
    report.bytes_per_tier = dict(info.bytes_per_tier)
    report.offload_folder = info.offload_folder
    report.offload_cache_hit = info.offload_reused
    report.offload_compression = info.offload_compression


def record_batches(report: JobReport, job: CheckedJob, loop: BatchLoop, loaded: LoadedModel) -> None:
    """Step 6: counts, latencies and throughput of the batches, the task's own figures, the outputs; the job completed."""
    batches, session = job.batches, job.batches[loop.start:]
    report.resumed_from_batch = loop.start
    report.first_batch_seconds = loop.first_batch_seconds
    report.batches = len(batches)
    report.samples = sum(len(b.sample_ids) for b in batches)
    report.tokens = sum(b.num_tokens for b in batches)
    report.batch_latency_p50_s = percentile(loop.writer.batch_seconds, 50)
    report.batch_latency_p90_s = percentile(loop.writer.batch_seconds, 90)
    if session and loop.seconds > 0:
        report.samples_per_s = sum(len(b.sample_ids) for b in session) / loop.seconds
        report.tokens_per_s = sum(b.num_tokens for b in session) / loop.seconds
    report.task_metrics = job.task.metrics()
    if job.cfg.task.name == "generate":
        _decode_batch_hint(report, job, loaded)
    schedule = getattr(loaded.info, "schedule", None)
    if schedule is not None and any(schedule.unit_reads.values()):
        report.disk_unit_reads = dict(schedule.unit_reads)
    report.outputs = {**loop.writer.outputs(), "record": str(job.run_dir / METRICS_NAME)}
    report.status = "completed"


def _decode_batch_hint(report: JobReport, job: CheckedJob, loaded: LoadedModel) -> None:
    """Record the batch from which decoding is bound by compute, not disk reads; say so where data.batch_size is below it."""
    from bigjob.engine.run.decode_batch import decode_batch_of

    rows = decode_batch_of(loaded.model)
    if rows is None:
        return
    report.task_metrics["compute_bound_batch"] = rows
    if job.cfg.data.batch_size < rows:
        logger.info(
            "each decoding step read part of the disk tier from disk: steps cost about the same up to data.batch_size=%d "
            "(this job: %d), so a larger batch gives up to %.0fx the tokens per second",
            rows, job.cfg.data.batch_size, rows / job.cfg.data.batch_size,
        )


def finish(report: JobReport, memory: MemorySampler, started: float) -> JobReport:
    """The last memory sample, the peaks, the end time and the process; then ``metrics.json`` written atomically."""
    memory.sample()
    report.peak_rss_bytes = memory.peak_rss
    report.peak_anon_bytes = memory.peak_anon
    report.peak_cuda_allocated_bytes = cuda_peaks()
    report.finished_at = time.time()
    report.wall_seconds = report.finished_at - started
    report.host, report.pid, report.parent_pid = platform.node(), os.getpid(), os.getppid()
    report.write()
    return report
