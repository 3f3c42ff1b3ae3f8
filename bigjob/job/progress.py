"""Resumable outputs: results appended per batch, with a marker saying how far they are valid.

In a run folder::

    predictions.jsonl          one JSON record per sample, appended batch by batch
    tensors/batch_00003.safetensors   per-batch tensors (e.g. full logits), when a task has them
    progress.json              {"job_key", "batches_done", "predictions_bytes", "batch_seconds"}

A batch counts as done only once ``progress.json`` (written atomically, after the batch's
lines are flushed to disk) says so. On a rerun of the same folder, :meth:`ResultWriter.resume`
cuts ``predictions.jsonl`` back to the recorded length and removes tensor files of
unfinished batches, so a job killed at any instant continues after its last finished
batch and ends with the same files as an uninterrupted run.

>>> import tempfile
>>> from bigjob.job.tasks import BatchResult
>>> folder = Path(tempfile.mkdtemp())
>>> writer = ResultWriter(folder, job_key="k")
>>> writer.resume()
0
>>> writer.append(0, BatchResult([{"id": 0}]), seconds=0.1)
>>> ResultWriter(folder, job_key="k").resume()
1
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from bigjob.errors import JobError
from bigjob.job.report import atomic_write_text
from bigjob.job.tasks import BatchResult

__all__ = ["PREDICTIONS_NAME", "PROGRESS_NAME", "ResultWriter", "TENSORS_DIR"]

PREDICTIONS_NAME = "predictions.jsonl"
PROGRESS_NAME = "progress.json"
TENSORS_DIR = "tensors"
LEFTOVER_AGE_S = 60.0  # a temporary file this old in a run folder belongs to no write in progress


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s >= 0 for s in value
    )


# What a progress marker's fields may hold; anything else was not written by a run.
_FIELDS = {"batches_done": _count, "predictions_bytes": _count, "batch_seconds": _seconds}


def tensor_file_name(batch_index: int) -> str:
    return f"batch_{batch_index:05d}.safetensors"


class ResultWriter:
    """Appends each batch's results to a run folder and records the progress marker."""

    def __init__(self, run_dir: str | os.PathLike[str], job_key: str) -> None:
        self.run_dir = Path(run_dir)
        self.job_key = job_key
        self.predictions = self.run_dir / PREDICTIONS_NAME
        self.tensors_dir = self.run_dir / TENSORS_DIR
        self.progress_path = self.run_dir / PROGRESS_NAME
        self.batches_done = 0
        self.batch_seconds: list[float] = []

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise JobError(f"progress marker {self.progress_path} is unreadable ({err}); delete it to start this run folder over") from None
        if not isinstance(data, dict):
            raise JobError(f"progress marker {self.progress_path} is not a JSON object; delete it to start this run folder over")
        for key, valid in _FIELDS.items():
            if key in data and not valid(data[key]):
                raise JobError(
                    f"progress marker {self.progress_path} has {key}={data[key]!r}, which no run writes; "
                    "delete it to start this run folder over, or choose another hydra.run.dir"
                )
        return data

    def _sweep_leftovers(self) -> None:
        """Temporary files of writes a killed run never finished (``.progress.json.*.tmp`` and the like).

        A write lives for milliseconds: only files older than :data:`LEFTOVER_AGE_S` are taken.
        """
        now = time.time()
        for folder in (self.run_dir, self.tensors_dir):
            for path in folder.glob(".*.tmp") if folder.is_dir() else ():
                with contextlib.suppress(OSError):
                    if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > LEFTOVER_AGE_S:
                        path.unlink()

    def _check_predictions(self, valid_bytes: int) -> None:
        if self.predictions.is_symlink() or (self.predictions.exists() and not self.predictions.is_file()):
            raise JobError(
                f"{self.predictions} is not a file; remove it to run this folder again, or choose another hydra.run.dir"
            )
        size = self.predictions.stat().st_size if self.predictions.exists() else 0
        if size < valid_bytes:
            raise JobError(
                f"{self.predictions} is {size} bytes but {self.progress_path} records {valid_bytes} finished; "
                "delete both to start this run folder over, or choose another hydra.run.dir"
            )

    def resume(self) -> int:
        """The number of batches already finished in this folder (0 for a fresh one).

        Anything written after the last finished batch is removed. A folder holding
        another job's results is refused rather than mixed.
        """
        progress = self._read_progress()
        if progress is not None and progress.get("job_key") != self.job_key:
            raise JobError(
                f"run folder {self.run_dir} holds results of a job with another config; "
                "choose a new hydra.run.dir (or hydra.sweep.dir) or delete that folder"
            )
        self._sweep_leftovers()
        done = int(progress.get("batches_done", 0)) if progress else 0
        valid_bytes = int(progress.get("predictions_bytes", 0)) if progress else 0
        self._check_predictions(valid_bytes)
        if self.predictions.exists() and self.predictions.stat().st_size != valid_bytes:
            with self.predictions.open("r+b") as handle:
                handle.truncate(valid_bytes)
        if self.tensors_dir.is_dir():
            for path in self.tensors_dir.glob("batch_*.safetensors"):
                try:
                    index = int(path.stem.split("_", 1)[1])
                except ValueError:
                    continue
                if index >= done:
                    path.unlink()
        self.batches_done = done
        self.batch_seconds = [float(s) for s in progress.get("batch_seconds", [])] if progress else []
        return done

    def append(self, batch_index: int, result: BatchResult, seconds: float) -> None:
        """Writes one batch's results, then moves the marker past it."""
        if batch_index != self.batches_done:
            raise JobError(f"batch {batch_index} written out of order (expected {self.batches_done})")
        if result.tensors:
            self.tensors_dir.mkdir(exist_ok=True)
            final = self.tensors_dir / tensor_file_name(batch_index)
            tmp = final.with_name("." + final.name + ".tmp")
            try:
                save_file(result.tensors, str(tmp))
                os.replace(tmp, final)
            except OSError as err:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise JobError(
                    f"cannot write the tensors of batch {batch_index} to {self.tensors_dir} ({err.strerror or err}); "
                    f"the {self.batches_done} finished batches are kept: free space there and run the job again to resume"
                ) from None
        lines = "".join(json.dumps(record) + "\n" for record in result.records).encode("utf-8")
        try:
            with self.predictions.open("ab") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
                size = handle.tell()
            marker = {
                "job_key": self.job_key,
                "batches_done": self.batches_done + 1,
                "predictions_bytes": size,
                "batch_seconds": [*self.batch_seconds, seconds],
            }
            atomic_write_text(self.progress_path, json.dumps(marker) + "\n")
        except OSError as err:  # disk full, quota, an I/O error: the finished batches stay valid
            raise JobError(
                f"cannot write the results of batch {batch_index} to {self.run_dir} ({err.strerror or err}); "
                f"the {self.batches_done} finished batches are kept: free space there and run the job again to resume"
            ) from None
        self.batches_done += 1
        self.batch_seconds.append(seconds)

    def outputs(self) -> dict[str, str]:
        """The output paths, for the report."""
        out = {"outputs": str(self.predictions)}
        if self.tensors_dir.is_dir():
            out["tensors"] = str(self.tensors_dir)
        return out
