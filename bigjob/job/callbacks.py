"""The Hydra callback of the ``bigjob`` app (``hydra.callbacks.bigjob`` in ``conf/config.yaml``).

* Before a run or sweep: checks that the output folder can be written, so an unwritable
  ``hydra.run.dir`` gives one clear line instead of a traceback from inside Hydra.
* After each sweep job and at the end of a sweep: writes ``summary.csv`` and
  ``summary.md`` into the sweep folder. Writing after every job keeps the summary complete
  when a failed job makes Hydra skip ``on_multirun_end``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from bigjob.errors import JobError
from bigjob.job.summary import write_summary

__all__ = ["BigJobCallback", "check_output_dir", "fail"]

logger = logging.getLogger(__name__)


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


class BigJobCallback(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_output_dir(str(config.hydra.run.dir), "hydra.run.dir")
        except JobError as err:
            fail(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
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

    @staticmethod
    def _summarize(config: DictConfig) -> Path | None:
        try:
            csv_path, _, _ = write_summary(str(config.hydra.sweep.dir))
            return csv_path
        except Exception as err:  # a summary problem must never fail the sweep's jobs
            logger.warning("could not write the sweep summary: %s", err)
            return None
