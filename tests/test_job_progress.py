"""Resumable outputs: whatever was written after the last finished batch is cut away on resume."""

from __future__ import annotations

import errno
import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file

from bigjob.errors import JobError
from bigjob.job.progress import LEFTOVER_AGE_S, PREDICTIONS_NAME, PROGRESS_NAME, ResultWriter
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


# --------------------------------------------------------------------------- damaged run folders, a full disk


@pytest.mark.parametrize(
    "field,value",
    [("predictions_bytes", None), ("predictions_bytes", -1), ("batch_seconds", "abc"), ("batch_seconds", [0.1, "x"]), ("batches_done", 1.5)],
)
def test_a_progress_marker_no_run_writes_is_one_line_naming_the_field(tmp_path, field, value):
    run(tmp_path, 2)
    marker = json.loads((tmp_path / PROGRESS_NAME).read_text())
    marker[field] = value
    (tmp_path / PROGRESS_NAME).write_text(json.dumps(marker))
    with pytest.raises(JobError) as info:
        ResultWriter(tmp_path, "k").resume()
    message = str(info.value)
    assert "\n" not in message and f"{field}={value!r}" in message and "hydra.run.dir" in message


def test_predictions_that_are_a_folder_or_shorter_than_recorded_are_refused(tmp_path):
    run(tmp_path / "dir", 2)
    (tmp_path / "dir" / PREDICTIONS_NAME).unlink()
    (tmp_path / "dir" / PREDICTIONS_NAME).mkdir()
    with pytest.raises(JobError, match="is not a file; remove it"):
        ResultWriter(tmp_path / "dir", "k").resume()
    run(tmp_path / "short", 2)
    recorded = json.loads((tmp_path / "short" / PROGRESS_NAME).read_text())["predictions_bytes"]
    (tmp_path / "short" / PREDICTIONS_NAME).write_bytes((tmp_path / "short" / PREDICTIONS_NAME).read_bytes()[:10])
    with pytest.raises(JobError, match=f"is 10 bytes but .* records {recorded} finished"):
        ResultWriter(tmp_path / "short", "k").resume()


def test_a_full_disk_mid_run_keeps_the_finished_batches_and_a_rerun_resumes(tmp_path, monkeypatch):
    whole = run(tmp_path / "whole", 4)
    writer = run(tmp_path / "part", 2)
    real_fsync = os.fsync

    def full(fd):  # noqa: ANN001
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(JobError) as info:
        writer.append(2, result(2), seconds=0.0)
    monkeypatch.setattr(os, "fsync", real_fsync)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message and "2 finished batches are kept" in message
    assert json.loads((tmp_path / "part" / PROGRESS_NAME).read_text())["batches_done"] == 2
    resumed = run(tmp_path / "part", 4)
    assert resumed.batches_done == whole.batches_done == 4
    assert (tmp_path / "part" / PREDICTIONS_NAME).read_bytes() == (tmp_path / "whole" / PREDICTIONS_NAME).read_bytes()


def test_temporary_files_a_killed_run_left_are_swept_on_resume(tmp_path):
    run(tmp_path, 2)
    old = [tmp_path / ".progress.json.abc123.tmp", tmp_path / ".metrics.json.x.tmp", tmp_path / "tensors" / ".batch_00002.safetensors.tmp"]
    fresh = tmp_path / ".device_map.json.new.tmp"  # a write in progress: too young to be a leftover
    for path in [*old, fresh]:
        path.write_text("partial")
    for path in old:
        os.utime(path, (time.time() - 2 * LEFTOVER_AGE_S,) * 2)
    assert ResultWriter(tmp_path, "k").resume() == 2
    assert [p.exists() for p in old] == [False, False, False] and fresh.exists()
