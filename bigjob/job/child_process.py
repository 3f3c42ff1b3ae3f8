"""The child-process protocol: what a job's parent and its child process exchange.

A parent (:mod:`bigjob.job.isolation`, or the warm :mod:`bigjob.job.forkserver` and
:mod:`bigjob.job.daemon` that fork children for it) writes a *spec*: the typed config as
JSON, the run folder, the parent's ``sys.path`` and log targets, and the paths of a result
file and an error file. The child (:func:`child_main`) runs the job and leaves exactly one
of the two: the report as JSON, or the error's class names, message and traceback. The
parent then turns the error file, or the exit code of a child that left none, back into an
exception (:func:`child_failure`).

>>> import dataclasses
>>> from bigjob.job.schema import JobConfig
>>> config_from_json(json.loads(json.dumps(dataclasses.asdict(JobConfig())))) == JobConfig()
True
>>> type(child_failure(Path("/nonexistent"), ORPHANED_EXIT, 1, Path("."))).__name__
'JobError'
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from bigjob.errors import BigJobError, JobError
from bigjob.job.report import atomic_write_text
from bigjob.job.schema import JobConfig
from bigjob.job.stopping import Terminated, sigterm_stops

__all__ = ["BOOT", "ChildTraceback", "JobProcessError", "child_failure", "child_main", "config_from_json", "log_targets"]

logger = logging.getLogger(__name__)

# How often the child checks that its parent is still alive, in seconds.
PARENT_POLL_S = 1.0
# Exit code of a child whose parent died.
ORPHANED_EXIT = 75
# The child's first statements: the parent's import path before anything of bigjob is imported.
BOOT = (
    "import json, sys; spec = json.load(open(sys.argv[1], encoding='utf-8')); "
    "sys.path[:0] = [p for p in spec['sys_path'] if p not in sys.path]; "
    "from bigjob.job.child_process import child_main; sys.exit(child_main(spec))"
)


class ChildTraceback(Exception):
    """The formatted traceback of an error raised in a job's child process (the ``__cause__`` of the re-raised error)."""

    def __str__(self) -> str:
        return "\n\n" + str(self.args[0]).rstrip() if self.args else ""


class JobProcessError(RuntimeError):
    """A job's child process raised something other than a :class:`BigJobError`: a crash, not bad input."""


def config_from_json(data: dict[str, Any]) -> JobConfig:
    """The typed :class:`JobConfig` of ``dataclasses.asdict`` data (checked by the schema again)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JobConfig), data))  # type: ignore[return-value]


def child_failure(error_file: Path, code: int, pid: int, run_dir: Path) -> BaseException:
    """The exception to raise in the parent for a child that ended with ``code``."""
    try:
        info = json.loads(error_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict):
        cls = _error_class(info.get("classes") or [])
        message = str(info.get("message", ""))
        err: BaseException
        if cls is not None:
            err = cls(message)
        elif info.get("type") == "Terminated":
            err = Terminated()
        elif "KeyboardInterrupt" in (info.get("classes") or []):
            err = KeyboardInterrupt()
        else:
            err = JobProcessError(f"the job process (pid {pid}) failed with {info.get('type')}: {message}")
        err.__cause__ = ChildTraceback(str(info.get("traceback", "")))
        return err
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return JobError(
            f"the job process (pid {pid}) was killed by {name}{hint}; {run_dir} keeps the finished batches: run the job again to resume"
        )
    if code == ORPHANED_EXIT:
        return JobError(f"the job process (pid {pid}) stopped because the process that started it went away")
    return JobError(f"the job process (pid {pid}) exited with code {code} without a report; see the log in {run_dir}")


def _error_class(names: list[str]) -> type[BigJobError] | None:
    """The first of ``names`` (a class's MRO) that is an error class of :mod:`bigjob.errors` (nothing else is looked up)."""
    from bigjob import errors

    for name in names:
        cls = getattr(errors, name, None) if name in errors.__all__ else None
        if isinstance(cls, type) and issubclass(cls, BigJobError):
            return cls
    return None


def log_targets() -> dict[str, Any]:
    """The root logger's level and its file and console handlers, for the child to log alike."""
    root = logging.getLogger()
    handlers = []
    for handler in root.handlers:
        formatter = handler.formatter
        entry: dict[str, Any] = {
            "level": handler.level,
            "format": getattr(formatter, "_fmt", None),
            "datefmt": getattr(formatter, "datefmt", None),
        }
        if isinstance(handler, logging.FileHandler):
            handlers.append({**entry, "file": handler.baseFilename})
        elif isinstance(handler, logging.StreamHandler):
            stream = getattr(handler, "stream", None)
            if stream in (sys.stdout, sys.__stdout__):
                handlers.append({**entry, "stream": "stdout"})
            elif stream in (sys.stderr, sys.__stderr__):
                handlers.append({**entry, "stream": "stderr"})
    return {"level": root.level, "handlers": handlers}


def child_main(spec: dict[str, Any]) -> int:
    """The child process: configure logging, run the job, leave its report or its error for the parent."""
    _exit_with_parent(int(spec["parent_pid"]))
    _configure_logging(spec.get("logging") or {})
    logger.info("job process %d (started by %d) runs %s", os.getpid(), spec["parent_pid"], spec["run_dir"])
    try:
        from bigjob.job.mapped_files import report_sigbus_to
        from bigjob.job.runner import run_job

        report_sigbus_to(spec["error"])
        with sigterm_stops():  # the parent, the daemon and SLURM stop a job with SIGTERM: it ends like Ctrl-C
            report = run_job(config_from_json(spec["config"]), spec["run_dir"], multirun=bool(spec["multirun"]))
        if report.pid == os.getpid():  # the work ran here (not a record reused from an earlier run)
            report.isolated = True
            report.write()
        atomic_write_text(spec["result"], report.to_json())
        return 0
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        _write_error(Path(spec["error"]), err)
        return 1


def _write_error(path: Path, err: BaseException) -> None:
    info = {
        "type": type(err).__name__,
        "classes": [cls.__name__ for cls in type(err).__mro__],
        "message": str(err),
        "traceback": "".join(traceback.format_exception(type(err), err, err.__traceback__)),
    }
    atomic_write_text(path, json.dumps(info))


def _exit_with_parent(parent_pid: int) -> None:
    """Ends this process once its parent is gone (a killed launcher worker must not leave jobs running)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(ORPHANED_EXIT)
            time.sleep(PARENT_POLL_S)

    threading.Thread(target=watch, name="bigjob-parent-watch", daemon=True).start()


def _configure_logging(targets: dict[str, Any]) -> None:
    root = logging.getLogger()
    root.setLevel(int(targets.get("level", logging.INFO)))
    for entry in targets.get("handlers", []):
        handler: logging.Handler
        if "file" in entry:
            handler = logging.FileHandler(entry["file"], mode="a", encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stdout if entry.get("stream") == "stdout" else sys.stderr)
        handler.setLevel(int(entry.get("level", logging.NOTSET)))
        if entry.get("format"):
            handler.setFormatter(logging.Formatter(entry["format"], entry.get("datefmt")))
        root.addHandler(handler)
