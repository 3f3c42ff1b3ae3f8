"""Sweep summaries from job folders, including failed and unfinished jobs."""

from __future__ import annotations

import csv

import pytest

from bigjob.errors import JobError
from bigjob.job.report import JobReport
from bigjob.job.summary import COLUMNS, collect_rows, write_summary


def make_job(sweep, name, report=None, overrides=()):
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if report is not None:
        report.run_dir = str(folder)
        report.write()
    return folder


def test_summary_lists_every_job_in_order_with_failures(tmp_path):
    ok = JobReport(status="completed", run_dir="", job_key="a", mode="run", plan_cache_hit=False, samples_per_s=12.345,
                   peak_rss_bytes=300 * 2**20, bytes_per_tier={"cpu": 2**20, "disk": 0})
    bad = JobReport(status="failed", run_dir="", job_key="", mode="run", error="data.batch_size must be at least 1, got 0")
    make_job(tmp_path, "10", ok, ["data.batch_size=8"])
    make_job(tmp_path, "2", bad, ["data.batch_size=0"])
    make_job(tmp_path, "3", None, ["data.batch_size=1"])  # crashed before writing a record
    (tmp_path / "multirun.yaml").write_text("x: 1")

    csv_path, md_path, rows = write_summary(tmp_path)
    assert [r["job"] for r in rows] == ["2", "3", "10"]
    assert [r["status"] for r in rows] == ["failed", "failed", "completed"]
    assert rows[0]["error"].startswith("data.batch_size") and "no metrics.json" in rows[1]["error"]
    assert rows[2]["overrides"] == "data.batch_size=8" and rows[2]["samples_per_s"] == 12.35 and rows[2]["tiers_mib"] == "cpu=1.0"
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == COLUMNS and table[2]["plan_cache_hit"] == "False" and table[2]["peak_rss_mib"] == "300.0"
    md = md_path.read_text()
    assert "3 jobs, 2 failed" in md and md.count("\n| ") == 4


def test_missing_sweep_folder_is_a_job_error(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        collect_rows(tmp_path / "nope")
