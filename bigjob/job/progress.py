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

import json
import os
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
        return data

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
        done = int(progress["batches_done"]) if progress else 0
        valid_bytes = int(progress["predictions_bytes"]) if progress else 0
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
            save_file(result.tensors, str(tmp))
            os.replace(tmp, final)
        lines = "".join(json.dumps(record) + "\n" for record in result.records).encode("utf-8")
        with self.predictions.open("ab") as handle:
            handle.write(lines)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        self.batches_done += 1
        self.batch_seconds.append(seconds)
        marker = {
            "job_key": self.job_key,
            "batches_done": self.batches_done,
            "predictions_bytes": size,
            "batch_seconds": self.batch_seconds,
        }
        atomic_write_text(self.progress_path, json.dumps(marker) + "\n")

    def outputs(self) -> dict[str, str]:
        """The output paths, for the report."""
        out = {"outputs": str(self.predictions)}
        if self.tensors_dir.is_dir():
            out["tensors"] = str(self.tensors_dir)
        return out
