"""The run folder: checked before anything is written, and the reuse of a job already completed.

A run folder (``hydra.run.dir``, or a sweep's job folder) must be writable and may hold only
this job's results: its progress marker and ``metrics.json`` carry the job key, and a folder
of another job is refused before anything in it is replaced. A folder holding this job
completed is the answer itself; in sweeps, a job completed in another folder (remembered in
the cache as ``run:<job key>``) is copied instead of run again.

>>> import tempfile
>>> folder = Path(tempfile.mkdtemp()) / "run"
>>> ensure_writable(folder)
>>> check_run_folder(folder, key="k")  # a new folder holds nobody's results
>>> reuse_completed(folder, "k", cache=None, multirun=False) is None
True
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from bigjob.errors import JobError
from bigjob.job.cache import JobCache
from bigjob.job.progress import ResultWriter
from bigjob.job.report import DEVICE_MAP_NAME, JobReport, read_report

__all__ = ["check_run_folder", "ensure_writable", "remember_completed", "reuse_completed"]

logger = logging.getLogger(__name__)


def ensure_writable(run_dir: Path) -> None:
    """Creates ``run_dir`` and writes a probe file there; a JobError naming ``hydra.run.dir`` when it cannot."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".bigjob-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise JobError(
            f"output folder {str(run_dir)!r} is not writable ({err.strerror}); set hydra.run.dir (or hydra.sweep.dir) to a writable folder"
        ) from None


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


def reuse_completed(run_dir: Path, key: str, cache: JobCache | None, multirun: bool) -> JobReport | None:
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


def remember_completed(cache: JobCache, report: JobReport) -> None:
    """Records in the cache where this job (``report.job_key``) completed, for :func:`reuse_completed` in later sweeps."""
    cache.set(f"run:{report.job_key}", {"kind": "run", "run_dir": report.run_dir, "finished": report.finished_at})
