"""`bigjob-summarize --plot`: a PNG of throughput and peak memory against the CPU budget."""

from __future__ import annotations

import struct
import sys

import pytest

from _jobkit import run_entry
from bigjob.errors import JobError
from bigjob.job.plot import plot_sweep, sweep_points, sweep_series
from bigjob.job.report import JobReport

MIB = 2**20


def make_sweep(root, jobs):
    """A sweep folder as Hydra and the runner leave it: per job .hydra/config.yaml, overrides.yaml and metrics.json."""
    for i, (budget_mib, batch_size, tokens_per_s, status) in enumerate(jobs):
        folder = root / str(i)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text(f"data:\n  batch_size: {batch_size}\n")
        (folder / ".hydra" / "overrides.yaml").write_text(f"- placement.max_memory.cpu={budget_mib}MiB\n- data.batch_size={batch_size}\n")
        JobReport(
            status=status, run_dir=str(folder), job_key=str(i), mode="run", budgets={"cpu": budget_mib * MIB, "disk": 2**62},
            tokens_per_s=tokens_per_s, samples_per_s=tokens_per_s / 64, peak_anon_bytes=(300 + budget_mib) * MIB, start_anon_bytes=300 * MIB,
            error=None if status == "completed" else "boom",
        ).write()
    return root


JOBS = [(64, 1, 900.0, "completed"), (128, 1, 1500.0, "completed"), (256, 1, 2100.0, "completed"),
        (64, 8, 2500.0, "completed"), (128, 8, 4000.0, "completed"), (256, 8, 0.0, "failed")]


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_points_are_the_completed_jobs_with_their_budget_and_batch_size(tmp_path):
    points = sweep_points(make_sweep(tmp_path, JOBS))
    assert [(p.cpu_budget_bytes // MIB, p.batch_size) for p in points] == [(64, 1), (128, 1), (256, 1), (64, 8), (128, 8)]
    assert points[1].added_memory_bytes == 128 * MIB


def test_plot_writes_a_valid_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_sweep(make_sweep(tmp_path, JOBS))
    assert path == tmp_path / "summary.png" and path.stat().st_size > 10_000
    assert png_size(path) == (1100, 450)


def test_the_command_draws_next_to_the_summary(tmp_path):
    pytest.importorskip("matplotlib")
    make_sweep(tmp_path / "sweep", JOBS)
    out = run_entry("summarize_main", [str(tmp_path / "sweep"), "--plot"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sweep" / "summary.csv").exists() and png_size(tmp_path / "sweep" / "summary.png")[0] > 0
    assert "summary.png" in out.stdout
    elsewhere = run_entry("summarize_main", [str(tmp_path / "sweep"), "--plot-file", str(tmp_path / "mine.png")], tmp_path)
    assert elsewhere.returncode == 0 and png_size(tmp_path / "mine.png")[0] > 0


def test_a_sweep_with_nothing_to_draw_is_one_clear_error(tmp_path):
    pytest.importorskip("matplotlib")
    make_sweep(tmp_path / "sweep", [(64, 1, 0.0, "failed")])
    with pytest.raises(JobError, match="no completed run"):
        plot_sweep(tmp_path / "sweep")
    out = run_entry("summarize_main", [str(tmp_path / "sweep"), "--plot"], tmp_path)
    assert out.returncode == 1 and out.stderr.startswith("error: ") and "Traceback" not in out.stderr


def test_without_matplotlib_the_error_says_what_to_install(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    with pytest.raises(JobError, match=r'pip install matplotlib \(or pip install "\.\[plot\]" in bigjob'):
        plot_sweep(make_sweep(tmp_path, JOBS))


def test_every_swept_key_but_the_cpu_budget_splits_the_lines(tmp_path):
    jobs = [(64, 1, 900.0, "completed"), (128, 1, 1500.0, "completed"), (64, 1, 300.0, "completed"), (128, 1, 500.0, "completed"),
            (64, 8, 2500.0, "completed")]
    sweep = make_sweep(tmp_path, jobs)
    for job, dtype in enumerate(["bfloat16", "bfloat16", "float32", "float32", "bfloat16"]):
        path = sweep / str(job) / ".hydra" / "overrides.yaml"
        path.write_text(path.read_text() + f"- dtype={dtype}\n- quiet=true\n")  # quiet: the same everywhere, not swept
    series = sweep_series(sweep_points(sweep))
    assert {label: [(p.cpu_budget_bytes // MIB, p.tokens_per_s) for p in line] for label, line in series.items()} == {
        "data.batch_size=1, dtype=bfloat16": [(64, 900.0), (128, 1500.0)],
        "data.batch_size=1, dtype=float32": [(64, 300.0), (128, 500.0)],
        "data.batch_size=8, dtype=bfloat16": [(64, 2500.0)],
    }
    assert png_size(plot_sweep(sweep))[0] > 0


def test_a_sweep_of_the_budget_alone_is_one_line(tmp_path):
    series = sweep_series(sweep_points(make_sweep(tmp_path, JOBS[:3])))
    assert list(series) == ["all jobs"] and [p.cpu_budget_bytes // MIB for p in series["all jobs"]] == [64, 128, 256]
