"""Sweep summaries: one row of key metrics per job, as CSV and markdown.

A sweep folder holds one folder per job (Hydra's ``hydra.sweep.subdir``), each with its
``.hydra/overrides.yaml`` and, once the job got that far, ``metrics.json``. A job folder
without a record is reported as failed, so a summary can always be written, even when
some jobs crashed (Hydra skips ``on_multirun_end`` after a failure; the callback also
writes the summary after every job).

>>> import tempfile
>>> from bigjob.job.report import JobReport
>>> sweep = Path(tempfile.mkdtemp())
>>> (sweep / "0").mkdir()
>>> _ = JobReport(status="completed", run_dir=str(sweep / "0"), job_key="k", mode="run", samples_per_s=2.0).write()
>>> (sweep / "1" / ".hydra").mkdir(parents=True)
>>> [(r["job"], r["status"]) for r in collect_rows(sweep)]
[('0', 'completed'), ('1', 'failed')]
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from bigjob.errors import JobError
from bigjob.job.report import METRICS_NAME, atomic_write_text, read_report

__all__ = ["COLUMNS", "collect_rows", "render_csv", "render_markdown", "write_summary"]

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
COLUMNS = [
    "job",
    "status",
    "overrides",
    "plan_cache_hit",
    "plan_s",
    "offload_cache_hit",
    "load_s",
    "batch_p50_s",
    "batch_p90_s",
    "samples_per_s",
    "tokens_per_s",
    "peak_rss_mib",
    "peak_anon_mib",
    "tiers_mib",
    "error",
]


def _overrides(job_dir: Path) -> str:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return ""
    try:
        from omegaconf import OmegaConf

        return " ".join(str(o) for o in OmegaConf.load(path))
    except Exception:  # a damaged file must not stop the summary
        return "?"


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _is_job_dir(path: Path) -> bool:
    return path.is_dir() and ((path / ".hydra").is_dir() or (path / METRICS_NAME).exists())


def _sort_key(path: Path) -> tuple[int, int | str]:
    return (0, int(path.name)) if path.name.isdigit() else (1, path.name)


def collect_rows(sweep_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One row per job folder of ``sweep_dir``, in job order."""
    sweep = Path(sweep_dir)
    if not sweep.is_dir():
        raise JobError(f"sweep folder '{sweep}' does not exist; pass the folder a `bigjob -m` run printed")
    rows = []
    for job_dir in sorted((p for p in sweep.iterdir() if _is_job_dir(p)), key=_sort_key):
        report = read_report(job_dir)
        row: dict[str, Any] = {c: None for c in COLUMNS}
        row["job"] = job_dir.name
        row["overrides"] = _overrides(job_dir)
        if report is None:
            row["status"] = "failed"
            row["error"] = f"no {METRICS_NAME} (see {job_dir.name}/bigjob.log)"
        else:
            tiers = report.bytes_per_tier or report.planned_bytes
            row.update(
                status="skipped" if report.reused_from else report.status,
                plan_cache_hit=report.plan_cache_hit,
                plan_s=_round(report.plan_seconds),
                offload_cache_hit=report.offload_cache_hit,
                load_s=_round(report.load_seconds),
                batch_p50_s=_round(report.batch_latency_p50_s),
                batch_p90_s=_round(report.batch_latency_p90_s),
                samples_per_s=_round(report.samples_per_s, 2),
                tokens_per_s=_round(report.tokens_per_s, 1),
                peak_rss_mib=_mib(report.peak_rss_bytes),
                peak_anon_mib=_mib(report.peak_anon_bytes),
                tiers_mib=" ".join(f"{d}={_mib(n)}" for d, n in tiers.items() if n),
                error=report.error,
            )
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return str(value)


def render_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row[k]) for k in COLUMNS})
    return out.getvalue()


def render_markdown(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured markdown table (pipes in values escaped).

    >>> render_markdown([{c: None for c in COLUMNS} | {"job": "0", "status": "completed"}]).splitlines()[2].startswith("| 0 | completed |")
    True
    """
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]).replace("|", "\\|").replace("\n", " ") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | os.PathLike[str]) -> tuple[Path, Path, list[dict[str, Any]]]:
    """Writes ``summary.csv`` and ``summary.md`` into ``sweep_dir`` (atomically); returns their paths and the rows."""
    sweep = Path(sweep_dir)
    rows = collect_rows(sweep)
    csv_path, md_path = sweep / SUMMARY_CSV, sweep / SUMMARY_MD
    atomic_write_text(csv_path, render_csv(rows))
    failed = sum(1 for r in rows if r["status"] == "failed")
    header = f"# Sweep {sweep}\n\n{len(rows)} jobs, {failed} failed.\n\n"
    atomic_write_text(md_path, header + render_markdown(rows))
    return csv_path, md_path, rows
