"""Step 6 of a job: the task run batch by batch, each batch's results appended with a progress marker.

The loop resumes where the run folder's progress marker says (:class:`~bigjob.job.progress.ResultWriter`):
a job killed at any instant continues after its last finished batch. The progress bar is
off with ``quiet`` or when stderr is not a terminal. :data:`KILL_AFTER_ENV` is a testing
hook: the process SIGKILLs itself after that many batches of this session.

A file the weights are mapped from that is changed in place fails the forward it happened
in, or the next one (the engine checks before and after every forward,
:mod:`bigjob.engine.tiers.sources`): that batch is never recorded, and its
:class:`~bigjob.errors.CheckpointError` gets the job's side of the story (which batch, how
many are kept, run again to continue), since the progress marker still ends before it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from tqdm import tqdm

from bigjob.errors import CheckpointError
from bigjob.job.checked_job import CheckedJob
from bigjob.job.model_loading import LoadedModel
from bigjob.job.progress import ResultWriter

__all__ = ["KILL_AFTER_ENV", "BatchLoop", "run_batches"]

# Testing hook: SIGKILL this process right after that many batches of this session.
KILL_AFTER_ENV = "BIGJOB_KILL_AFTER_BATCHES"


@dataclass(frozen=True)
class BatchLoop:
    """What step 6 hands on: the writer of the results and how this session's batches went."""

    writer: ResultWriter  # every finished batch's seconds, the output paths
    start: int  # batches finished before this session (resumed from)
    seconds: float  # this session's loop, wall clock
    first_batch_seconds: float | None  # the job's start to this session's first batch written; None: no batch ran


def run_batches(job: CheckedJob, loaded: LoadedModel, started: float) -> BatchLoop:
    """Step 6: runs the task on each batch not finished yet and appends its results; ``started`` is the job's start (``time.time()``)."""
    writer = ResultWriter(job.run_dir, job.key)
    start = writer.resume()
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    quiet = job.cfg.quiet or not sys.stderr.isatty()
    first_batch_seconds = None
    task, batches = job.task, job.batches
    loop_start = time.perf_counter()
    for batch in tqdm(batches[start:], initial=start, total=len(batches), disable=quiet, desc=task.name, unit="batch"):
        t = time.perf_counter()
        try:
            result = task.run(loaded.model, batch, loaded.info.main_device)
        except CheckpointError as err:  # a mapped file changed in place: this batch's outputs are not to be kept
            raise type(err)(
                f"{err} Batch {batch.index} was not recorded; the {writer.batches_done} batches before it are kept: "
                "run the job again to continue with it"
            ) from None
        writer.append(batch.index, result, time.perf_counter() - t)
        if first_batch_seconds is None:
            first_batch_seconds = time.time() - started
        if kill_after and writer.batches_done - start >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    return BatchLoop(writer, start, time.perf_counter() - loop_start, first_batch_seconds)
