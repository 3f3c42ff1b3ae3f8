"""The Hydra callback of the ``bigjob`` app (``hydra.callbacks.bigjob`` in ``conf/config.yaml``).

* Before a run or sweep: checks that the output folder can be written, so an unwritable
  ``hydra.run.dir`` gives one clear line instead of a traceback from inside Hydra.
* After each sweep job and at the end of a sweep: writes ``summary.csv`` and
  ``summary.md`` into the sweep folder. Writing after every job keeps the summary complete
  when a failed job makes Hydra skip ``on_multirun_end``.
* At the end of a sweep, in the process that launched it: notes the jobs of this sweep that
  failed (:func:`sweep_failures`). Under a launcher, jobs run in other processes (joblib,
  Ray and submitit workers), so only their records can tell the CLI to exit with code 1.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from bigjob.errors import JobError
from bigjob.job.summary import write_summary

__all__ = ["BigJobCallback", "check_output_dir", "fail", "launched_here", "forget_sweep", "launched_sweep", "sweep_failures"]

logger = logging.getLogger(__name__)

# (job folder, error) of the jobs of the last sweep this process launched that failed.
_sweep_failures: list[tuple[str, str]] = []
# The process that launched the running sweep (a launcher's workers are other processes).
_launching_pid: int | None = None
# The folder of the last sweep this process launched.
_sweep_dir: Path | None = None


def launched_here() -> bool:
    """Whether this process launched the sweep it runs a job of (not a joblib, Ray or submitit worker)."""
    return _launching_pid == os.getpid()


def launched_sweep() -> Path | None:
    """The folder of the last sweep this process launched (even one a crashed job ended early), or None."""
    return _sweep_dir if launched_here() else None


def forget_sweep() -> None:
    """Forgets the last sweep (a command starting in a process that ran one before)."""
    global _sweep_dir
    _sweep_dir = None


def sweep_failures() -> list[tuple[str, str]]:
    """``(job folder, error)`` of each failed job of the last sweep launched by this process."""
    return list(_sweep_failures)


def fail(err: Exception) -> None:
    """Ends the process with one line on stderr and exit code 1 (a traceback with HYDRA_FULL_ERROR=1)."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    sys.stderr.write(f"error: {err}\n")
    sys.stderr.flush()
    sys.exit(1)


def check_output_dir(folder: str, key: str) -> None:
    """Creates ``folder`` and writes a probe file in it, or raises a JobError naming ``key``."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".bigjob-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise JobError(f"output folder {folder!r} is not writable ({err.strerror}); set {key} to a writable folder") from None


def _check_earlier_results(config: DictConfig) -> None:
    """Refuses a run folder holding another job's results before Hydra rewrites its ``.hydra/`` record."""
    import copy

    from omegaconf import open_dict, read_write

    run_dir = Path(str(config.hydra.run.dir)).absolute()
    if not any((run_dir / name).exists() for name in ("progress.json", "metrics.json")):
        return
    from bigjob.job.config import to_job_config
    from bigjob.job.identity import job_identity
    from bigjob.job.run_folder import check_run_folder

    try:
        task_config = copy.deepcopy(config)  # what Hydra hands the task: the config without its hydra node
        with read_write(task_config), open_dict(task_config):
            del task_config["hydra"]
        key = job_identity(to_job_config(task_config))
    except Exception:  # a config the job itself will refuse, with a better message (and writing nothing here)
        return
    check_run_folder(run_dir, key)


class BigJobCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_dir(str(config.hydra.run.dir), "hydra.run.dir")
            _check_earlier_results(config)
        except JobError as err:
            fail(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _launching_pid, _sweep_dir
        self._sweep_started = time.time()
        _launching_pid = os.getpid()
        _sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        _sweep_failures.clear()
        try:
            check_output_dir(str(config.hydra.sweep.dir), "hydra.sweep.dir")
        except JobError as err:
            fail(err)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._summarize(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        csv_path = self._summarize(config)
        if csv_path is not None:
            logger.info("sweep summary: %s", csv_path)
        self._note_failures(Path(str(config.hydra.sweep.dir)).absolute())

    def _note_failures(self, sweep_dir: Path) -> None:
        """Failed jobs whose folder this sweep wrote (older folders of a reused sweep folder are left out)."""
        from bigjob.job.summary import collect_rows

        started = getattr(self, "_sweep_started", 0.0) - 1.0  # mtimes have coarse clocks on some filesystems
        try:
            rows = collect_rows(sweep_dir)
        except Exception as err:  # the summary's own problem was logged already
            logger.warning("could not read the sweep's records: %s", err)
            return
        for row in rows:
            job_dir = sweep_dir / str(row["job"])
            if row["status"] == "failed" and _touched_since(job_dir, started):
                _sweep_failures.append((str(job_dir), str(row["error"] or "failed")))

    @staticmethod
    def _summarize(config: DictConfig) -> Path | None:
        try:
            csv_path, _, _ = write_summary(str(config.hydra.sweep.dir))
            return csv_path
        except Exception as err:  # a summary problem must never fail the sweep's jobs
            logger.warning("could not write the sweep summary: %s", err)
            return None


def _touched_since(job_dir: Path, since: float) -> bool:
    for path in (job_dir / "metrics.json", job_dir / ".hydra" / "config.yaml", job_dir):
        try:
            return path.stat().st_mtime >= since
        except OSError:
            continue
    return False
