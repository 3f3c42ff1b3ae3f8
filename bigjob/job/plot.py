"""A picture of a sweep: throughput and peak memory against the CPU budget, one line per setting of the other swept keys.

Every key the sweep varied besides the CPU budget (the x axis) splits the lines: a sweep of
``data.batch_size=1,8 dtype=bfloat16,float32`` draws four, so bf16 and fp32 points are never
joined (:func:`sweep_series`).

Memory is drawn as the job's peak anonymous memory minus that at its start (the interpreter,
torch and the empty model): what the job's weights and activations took, the quantity the CPU
budget bounds, drawn with the budget itself as a dashed line.

``bigjob-summarize <sweep folder> --plot`` writes ``summary.png`` next to ``summary.csv``.
Needs matplotlib (``pip install ".[plot]"`` in bigjob's folder); it draws off-screen (Agg), so it works on
machines without a display. Completed jobs (and jobs skipped because an earlier run of theirs
completed) are drawn; failed ones are left out.

>>> import tempfile
>>> sweep_points(Path(tempfile.mkdtemp()))
[]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bigjob.errors import JobError
from bigjob.job.report import read_report
from bigjob.job.summary import collect_rows

__all__ = ["PLOT_NAME", "X_KEY", "SweepPoint", "plot_sweep", "sweep_points", "sweep_series"]

PLOT_NAME = "summary.png"
X_KEY = "placement.max_memory.cpu"  # the x axis; every other swept key splits the lines
MIB = 2**20


@dataclass(frozen=True)
class SweepPoint:
    """One job of a sweep as the plot sees it."""

    job: str
    cpu_budget_bytes: int
    batch_size: int | None
    tokens_per_s: float | None
    samples_per_s: float | None
    peak_memory_bytes: int | None  # peak anonymous memory (RSS where /proc is missing)
    start_memory_bytes: int | None  # the same at the job's start (the interpreter, torch, the empty model)
    overrides: tuple[tuple[str, str], ...] = ()  # the job's command-line ``key=value`` overrides, in order

    @property
    def added_memory_bytes(self) -> int | None:
        """Peak memory above the job's start: the weights it held and its activations, what the CPU budget bounds."""
        if self.peak_memory_bytes is None:
            return None
        return max(0, self.peak_memory_bytes - (self.start_memory_bytes or 0))


def _batch_size(job_dir: Path) -> int | None:
    """``data.batch_size`` of the job's resolved config (``.hydra/config.yaml``), or None."""
    path = job_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    try:
        from omegaconf import OmegaConf

        value: Any = OmegaConf.select(OmegaConf.load(path), "data.batch_size")
        return int(value) if value is not None else None
    except Exception:  # a damaged file leaves the job in an "unknown batch size" line
        return None


def _job_overrides(job_dir: Path) -> tuple[tuple[str, str], ...]:
    """``(key, value)`` of the job's ``.hydra/overrides.yaml`` (``+``/``++`` dropped from keys; deletions left out)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    try:
        from omegaconf import OmegaConf

        items = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
    except Exception:  # a damaged file leaves the job with no known settings
        return ()
    pairs = [item.split("=", 1) for item in items if "=" in item and not item.startswith("~")]
    return tuple((key.lstrip("+"), value) for key, value in pairs)


def sweep_series(points: list[SweepPoint], x_key: str = X_KEY) -> dict[str, list[SweepPoint]]:
    """The plot's lines: points grouped by their values of every swept key but ``x_key``, each sorted by CPU budget.

    A key is swept when the points do not all give it the same value. Labels read
    ``key=value, key=value`` (keys in name order); one line is labelled ``all jobs``.

    >>> def point(job, cpu, **settings):
    ...     overrides = ((X_KEY, f"{cpu}MiB"), *((k.replace("_", "."), v) for k, v in settings.items()))
    ...     return SweepPoint(job, cpu * MIB, None, 1.0, 1.0, None, None, overrides)
    >>> points = [point("0", 64, dtype="bfloat16", quiet="true"), point("1", 32, dtype="bfloat16", quiet="true"),
    ...           point("2", 64, dtype="float32", quiet="true")]
    >>> {label: [p.job for p in line] for label, line in sweep_series(points).items()}
    {'dtype=bfloat16': ['1', '0'], 'dtype=float32': ['2']}
    >>> list(sweep_series(points[:2]))
    ['all jobs']
    """
    settings = [dict(p.overrides) for p in points]
    keys = sorted({key for s in settings for key in s} - {x_key})
    swept = [key for key in keys if len({s.get(key) for s in settings}) > 1]
    series: dict[str, list[SweepPoint]] = {}
    for point, setting in sorted(zip(points, settings), key=lambda item: item[0].cpu_budget_bytes):
        label = ", ".join(f"{key}={setting.get(key, '?')}" for key in swept) or "all jobs"
        series.setdefault(label, []).append(point)
    return dict(sorted(series.items()))


def sweep_points(sweep_dir: str | os.PathLike[str]) -> list[SweepPoint]:
    """The completed jobs of ``sweep_dir`` that have a CPU budget, in job order."""
    sweep = Path(sweep_dir)
    points = []
    for row in collect_rows(sweep):
        if row["status"] not in ("completed", "skipped"):
            continue
        job_dir = sweep / str(row["job"])
        report = read_report(job_dir)
        if report is None or report.mode != "run" or "cpu" not in report.budgets:
            continue
        points.append(
            SweepPoint(
                job=str(row["job"]),
                cpu_budget_bytes=int(report.budgets["cpu"]),
                batch_size=_batch_size(job_dir),
                tokens_per_s=report.tokens_per_s,
                samples_per_s=report.samples_per_s,
                peak_memory_bytes=report.peak_anon_bytes or report.peak_rss_bytes,
                start_memory_bytes=report.start_anon_bytes if report.peak_anon_bytes else report.start_rss_bytes,
                overrides=_job_overrides(job_dir),
            )
        )
    return points


def plot_sweep(sweep_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """Draws the sweep to a PNG (default ``<sweep>/summary.png``) and returns its path."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise JobError('drawing a sweep needs matplotlib: pip install matplotlib (or pip install ".[plot]" in bigjob\'s folder)') from None
    sweep = Path(sweep_dir)
    points = sweep_points(sweep)
    if not points:
        raise JobError(f"sweep folder '{sweep}' has no completed run with a CPU budget to draw; run the sweep (or wait for a job) first")
    target = Path(path) if path is not None else sweep / PLOT_NAME

    figure = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    speed_ax, memory_ax = figure.subplots(1, 2, sharex=True)
    for label, line in sweep_series(points).items():
        budgets = [p.cpu_budget_bytes / MIB for p in line]
        speed_ax.plot(budgets, [p.tokens_per_s if p.tokens_per_s is not None else float("nan") for p in line], marker="o", label=label)
        memory_ax.plot(
            budgets,
            [p.added_memory_bytes / MIB if p.added_memory_bytes is not None else float("nan") for p in line],
            marker="o",
            label=label,
        )
    every_budget = sorted({p.cpu_budget_bytes / MIB for p in points})
    memory_ax.plot(every_budget, every_budget, linestyle="--", color="grey", label="the CPU budget")
    if every_budget[-1] >= 8 * every_budget[0] > 0:
        speed_ax.set_xscale("log", base=2)
    speed_ax.set(title="Throughput", xlabel="CPU budget (MiB)", ylabel="tokens / s")
    memory_ax.set(title="Peak memory above the job's start", xlabel="CPU budget (MiB)", ylabel="peak anonymous memory - at start (MiB)")
    for ax in (speed_ax, memory_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(f"Sweep {sweep.name or sweep}: {len(points)} completed jobs")
    figure.savefig(target, dpi=100)
    return target
