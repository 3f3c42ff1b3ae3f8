"""Job isolation: a job's work in a fresh child process (``runner.isolate``).

Launchers reuse processes: the basic launcher runs every job of a sweep in one process,
joblib's and Ray's workers take job after job. Memory a job allocated (and the allocator
kept), CUDA contexts and caches, threads and module state then carry over to the next job,
and its peak memory is no longer its own. :func:`execute` decides, and with isolation runs
:func:`~bigjob.job.runner.run_job` in a new Python process and waits for it:

* the child gets the typed config as JSON, the parent's ``sys.path`` and log handlers;
* its ``metrics.json`` measures only itself (``pid``, ``parent_pid``, ``isolated: true``);
* what parent and child exchange is :mod:`bigjob.job.child_process`;
* when it fails, the parent raises its error again: a :class:`~bigjob.errors.BigJobError`
  keeps its class and one-line message (so the CLI's errors do not change), chained to a
  :class:`~bigjob.job.child_process.ChildTraceback` that holds the child's formatted traceback (``HYDRA_FULL_ERROR=1``
  shows it); any other exception arrives as a :class:`JobProcessError` (a crash, shown with
  both tracebacks); a child killed by a signal is a :class:`~bigjob.errors.JobError` naming it;
* the child exits when its parent dies, so a killed launcher worker leaves no orphan.

A plain subprocess rather than ``multiprocessing``: it re-imports no launcher's
``__main__`` (loky's and Ray's workers have their own), works under daemonic workers, and
starts from a clean interpreter.

By default (``runner.isolate: null``) the jobs of a sweep are isolated and single runs are
not; neither are ``mode=plan`` jobs (they load no weights) nor jobs under the submitit
launcher, which already starts a process of its own for each.

>>> from bigjob.job.schema import JobConfig
>>> isolation_wanted(JobConfig(), multirun=True), isolation_wanted(JobConfig(), multirun=False)
(True, False)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bigjob.errors import JobError
from bigjob.job.child_process import BOOT, child_failure, log_targets
from bigjob.job.report import JobReport, read_report
from bigjob.job.schema import JobConfig

__all__ = ["execute", "isolation_wanted", "run_isolated"]

logger = logging.getLogger(__name__)

# Launchers that start a new process for every job (their jobs need no second one).
FRESH_PROCESS_LAUNCHERS = ("hydra_plugins.hydra_submitit_launcher.",)


def isolation_wanted(cfg: JobConfig, multirun: bool) -> bool:
    """``runner.isolate`` if set; else on for sweeps of runs (not of plans, which load nothing), and for
    single runs with ``runner.daemon``, unless the launcher gave this job a process of its own."""
    if cfg.runner.isolate is not None:
        return bool(cfg.runner.isolate)
    return (multirun or cfg.runner.daemon) and cfg.mode == "run" and not _fresh_process_per_job()


def _fresh_process_per_job() -> bool:
    """Whether the Hydra launcher running this job started a new process for it (submitit does)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return False
        target = str(HydraConfig.get().launcher.get("_target_", ""))
    except Exception:  # no Hydra context: a plain Python caller
        return False
    return target.startswith(FRESH_PROCESS_LAUNCHERS)


def execute(cfg: JobConfig, run_dir: str | os.PathLike[str], multirun: bool = False) -> JobReport:
    """Runs one job (see :func:`~bigjob.job.runner.run_job`), in a child process when isolation is wanted."""
    if isolation_wanted(cfg, multirun):
        return run_isolated(cfg, run_dir, multirun)
    from bigjob.job.runner import run_job

    return run_job(cfg, run_dir, multirun=multirun)


# --------------------------------------------------------------------------- parent side


def run_isolated(cfg: JobConfig, run_dir: str | os.PathLike[str], multirun: bool = False) -> JobReport:
    """Runs the job in a fresh ``python`` process and returns its report; raises the child's error."""
    run_dir = Path(run_dir).absolute()
    done = _completed_here(cfg, run_dir)
    if done is not None:
        return done  # a rerun sweep: no process started for a finished job
    if not sys.executable:
        raise JobError("runner.isolate needs the path of the Python interpreter (sys.executable is empty); set runner.isolate=false")
    with tempfile.TemporaryDirectory(prefix="bigjob-job-") as tmp:
        spec = {
            "config": dataclasses.asdict(cfg),
            "run_dir": str(run_dir),
            "multirun": multirun,
            "sys_path": [p for p in sys.path if isinstance(p, str)],
            "logging": log_targets(),
            "parent_pid": os.getpid(),
            "result": str(Path(tmp) / "report.json"),
            "error": str(Path(tmp) / "error.json"),
        }
        spec_path = Path(tmp) / "spec.json"
        started = time.perf_counter()
        server = _warm_server(cfg) if cfg.runner.warm_start or cfg.runner.daemon else None
        if server is not None:
            spec["env"] = dict(os.environ)  # the server's is from its start; the job gets today's
        try:
            spec_path.write_text(json.dumps(spec), encoding="utf-8")
        except TypeError as err:
            raise JobError(f"runner.isolate needs a config made of JSON values ({err}); set runner.isolate=false") from None
        if server is not None:
            try:
                pid = server.start(spec_path)
                logger.info("job running in child process %d, forked by warm-start process %s", pid, server.pid)
                try:
                    code = server.wait()
                except BaseException:  # interrupted: take the child down too
                    server.interrupt()
                    server.wait()
                    raise
            finally:
                if cfg.runner.daemon:
                    server.close()  # one connection per job; the shared forkserver stays for the next
        else:
            process = subprocess.Popen([sys.executable, "-c", BOOT, str(spec_path)])
            pid = process.pid
            logger.info("job running in child process %d (runner.isolate)", pid)
            try:
                code = process.wait()
            except BaseException:  # interrupted: take the child down too
                _stop(process)
                raise
        logger.info("child process %d ended with code %d after %.2f s", pid, code, time.perf_counter() - started)
        result = Path(spec["result"])
        if code == 0 and result.exists():
            return JobReport.from_json(result.read_text(encoding="utf-8"))
        raise child_failure(Path(spec["error"]), code, pid, run_dir)


def _warm_server(cfg: JobConfig) -> Any:
    """The warm-start process for this sweep (:mod:`bigjob.job.forkserver`), or None where there can be none."""
    from bigjob.job.forkserver import preload_modules, shared_server

    preload = preload_modules(cfg.model._target_, cfg.model.path)
    if cfg.runner.daemon:
        from bigjob.job.daemon import DaemonClient, daemon_usable

        if daemon_usable():
            return DaemonClient([*preload, "bigjob.job.isolation"], cfg.runner.daemon_idle_s)
        logger.info("runner.daemon: no fork() or Unix sockets here; the job starts a fresh Python instead")
        return None
    server = shared_server(preload)
    if server is None:
        logger.info("runner.warm_start: forking is not safe here; the job starts a fresh Python instead")
    return server


def _completed_here(cfg: JobConfig, run_dir: Path) -> JobReport | None:
    """The completed report of this very job in ``run_dir`` (what the child would return at once), or None."""
    if not cfg.skip_completed or cfg.mode != "run":
        return None
    own = read_report(run_dir)
    if own is None or own.status != "completed":
        return None
    from bigjob.job.identity import job_identity

    if own.job_key != job_identity(cfg):
        return None
    logger.info("run folder %s already holds this completed job; nothing to do", run_dir)
    return own


def _stop(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()



