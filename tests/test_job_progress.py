"""Resumable outputs: whatever was written after the last finished batch is cut away on resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bigjob.errors import JobError
from bigjob.job.progress import PREDICTIONS_NAME, PROGRESS_NAME, ResultWriter
from bigjob.job.tasks import BatchResult


def result(i):
    return BatchResult([{"id": 2 * i, "v": i}, {"id": 2 * i + 1, "v": -i}], {"x": torch.full((2, 3), float(i))})


def run(folder, batches, key="k"):
    folder.mkdir(exist_ok=True)
    writer = ResultWriter(folder, key)
    start = writer.resume()
    for i in range(start, batches):
        writer.append(i, result(i), seconds=0.01 * i)
    return writer


def test_resume_after_a_torn_write_equals_an_uninterrupted_run(tmp_path):
    whole = run(tmp_path / "whole", 5)
    part = run(tmp_path / "part", 3)
    # A kill in the middle of batch 3: half its lines and a stray tensor file are on disk.
    with (tmp_path / "part" / PREDICTIONS_NAME).open("a") as f:
        f.write('{"id": 6, "v": 3}\n{"id": 7, "v"')
    (tmp_path / "part" / "tensors" / "batch_00003.safetensors").write_bytes(b"partial")
    resumed = ResultWriter(tmp_path / "part", "k")
    assert resumed.resume() == 3
    for i in range(3, 5):
        resumed.append(i, result(i), seconds=0.0)
    assert (tmp_path / "part" / PREDICTIONS_NAME).read_bytes() == (tmp_path / "whole" / PREDICTIONS_NAME).read_bytes()
    for i in range(5):
        name = f"batch_{i:05d}.safetensors"
        assert torch.equal(load_file(str(tmp_path / "part" / "tensors" / name))["x"], load_file(str(tmp_path / "whole" / "tensors" / name))["x"])
    assert json.loads((tmp_path / "part" / PROGRESS_NAME).read_text())["batches_done"] == 5
    assert len(resumed.batch_seconds) == 5 and whole.batches_done == 5 and part.batches_done == 3


def test_lines_written_before_the_first_marker_are_dropped(tmp_path):
    (tmp_path / PREDICTIONS_NAME).write_text('{"id": 0}\n')
    assert ResultWriter(tmp_path, "k").resume() == 0
    assert (tmp_path / PREDICTIONS_NAME).read_text() == ""


def test_a_folder_of_another_job_is_refused(tmp_path):
    run(tmp_path, 2, key="a")
    with pytest.raises(JobError, match="another config"):
        ResultWriter(tmp_path, "b").resume()


def test_batches_must_come_in_order(tmp_path):
    writer = ResultWriter(tmp_path, "k")
    writer.resume()
    with pytest.raises(JobError, match="out of order"):
        writer.append(1, result(1), seconds=0.0)
