"""Command-line entry points: thin shells over :func:`bigjob.job.runner.run_job` and friends.

* ``bigjob`` / ``python -m bigjob``: the Hydra app (``-m`` for sweeps);
* ``bigjob-plan``: the same app with ``mode=plan``;
* ``bigjob-summarize <sweep folder>``: summary.csv and summary.md of a sweep;
* ``bigjob-cache [--dir D] list|info|clear|verify|prune|export|import``: the plan and offload cache.

Bad input ends with one line ``error: ...`` on stderr and exit code 1 (a full traceback
with ``HYDRA_FULL_ERROR=1``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import bigjob
from bigjob.cache_command import cache_main
from bigjob.console import app_help, bigjob_version, pipe_safe
from bigjob.errors import BigJobError, ConfigError
from bigjob.job import schema  # noqa: F401  (registers the config schema)
from bigjob.job.callbacks import fail, launched_here
from bigjob.job.config import to_job_config
from bigjob.job.report import JobReport, read_report

__all__ = ["cache_main", "config_dir", "main", "plan_main", "summarize_main"]

logger = logging.getLogger("bigjob")

# Jobs of this process's sweep that failed on bad input (the sweep goes on; the exit code is 1).
_failed_jobs: list[str] = []
MAP_LINES_SHOWN = 60


def config_dir() -> Path:
    """The Hydra config folder: ``bigjob/conf`` when installed, else the repository's ``conf/``."""
    installed = Path(bigjob.__file__).resolve().parent / "conf"
    if (installed / "config.yaml").is_file():
        return installed
    return Path(bigjob.__file__).resolve().parent.parent / "conf"


def _record_failure(run_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """Writes a failed ``metrics.json`` so sweep summaries list the job and its error."""
    if read_report(run_dir) is not None and read_report(run_dir).status == "completed":  # type: ignore[union-attr]
        return
    try:
        report = JobReport(status="failed", run_dir=str(run_dir), job_key="", mode=str(cfg.get("mode", "run")), error=str(err).splitlines()[0] if str(err) else type(err).__name__)
        report.write(run_dir)
    except OSError:
        pass  # an unwritable folder is the error being reported


def _print_plan(run_dir: Path, report: JobReport) -> None:
    from bigjob.engine.plan.device_map import DeviceMap

    device_map = DeviceMap.from_json((run_dir / "device_map.json").read_text(encoding="utf-8"))
    print(device_map.describe(report.user_budgets))
    items = list(device_map.items())
    print("\ndevice map:")
    for name, device in items[:MAP_LINES_SHOWN]:
        print(f"  {name or '(whole model)'}: {device}")
    if len(items) > MAP_LINES_SHOWN:
        print(f"  ... {len(items) - MAP_LINES_SHOWN} more in {run_dir / 'device_map.json'}")


def _task(cfg: DictConfig) -> None:
    from bigjob.job.isolation import execute
    from bigjob.job.stopping import sigterm_stops

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        with sigterm_stops():
            report = execute(to_job_config(cfg), run_dir, multirun=multirun)  # in a child process with runner.isolate
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (bigjob.job.stopping.Terminated)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _interrupted(run_dir, cfg, err)
        return
    except Exception as err:
        _record_failure(run_dir, cfg, err)
        if not isinstance(err, BigJobError) or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if multirun:  # the other jobs still run; the summary lists this one as failed
            if launched_here():  # else the launching process reports it once the sweep ends (see main)
                sys.stderr.write(f"error: job {hydra_cfg.job.num} ({run_dir}): {err}\n")
            _failed_jobs.append(str(run_dir))
            return
        fail(err)
        return
    if report.mode == "plan":
        _print_plan(run_dir, report)
    print(report.summary())


def _interrupted(run_dir: Path, cfg: DictConfig, err: KeyboardInterrupt) -> None:
    """Ctrl-C or SIGTERM: one line saying what is kept, a failed record for sweep summaries, exit code 130 or 143."""
    from bigjob.job.progress import PROGRESS_NAME
    from bigjob.job.stopping import exit_code, interrupted_line

    line, error = interrupted_line(run_dir, err, PROGRESS_NAME)
    _record_failure(run_dir, cfg, KeyboardInterrupt(error))
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(exit_code(err))


def _hydra_app() -> None:
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(_task)()


def main() -> None:
    """``bigjob``: run a job (or a sweep with ``-m``) from the command line; ``--version`` prints bigjob's."""
    if sys.argv[1:] == ["--version"]:
        print(f"bigjob {bigjob_version()}")
        return
    if sys.argv[1:] in (["--help"], ["-h"]):  # Hydra's own takes seconds; with overrides it still answers
        print(app_help(config_dir()))
        return
    from bigjob.job.callbacks import forget_sweep, sweep_failures
    from bigjob.job.suggest import check_command_line

    try:
        check_command_line(sys.argv[1:], config_dir())
    except ConfigError as err:
        fail(err)
    _failed_jobs.clear()
    forget_sweep()
    try:
        _hydra_app()
    finally:  # also when a job's crash ends the sweep early: the table shows how far it got
        _print_sweep_table()
    # Jobs a launcher ran in other processes (joblib, Ray, submitit) are known by their records.
    for job_dir, error in sweep_failures():
        if job_dir not in _failed_jobs:
            sys.stderr.write(f"error: job {Path(job_dir).name} ({job_dir}): {error}\n")
            _failed_jobs.append(job_dir)
    if _failed_jobs:
        sys.stderr.write(f"error: {len(_failed_jobs)} job(s) of the sweep failed; see the summary in the sweep folder\n")
        sys.exit(1)


def _print_sweep_table() -> None:
    """The summary table of the sweep this process launched (failed jobs included), rewritten from the records."""
    from bigjob.job.callbacks import launched_sweep
    from bigjob.job.summary import render_markdown, write_summary

    sweep = launched_sweep()
    if sweep is not None and sweep.is_dir():
        try:
            rows = write_summary(sweep)[2]
            failed = sum(1 for row in rows if row["status"] == "failed")
            print(f"\nsweep {sweep}: {len(rows)} jobs, {failed} failed\n\n{render_markdown(rows)}", end="", flush=True)
        except (BigJobError, OSError) as err:
            logger.warning("could not write the sweep summary: %s", err)


def plan_main() -> None:
    """``bigjob-plan``: plan only (``mode=plan``): print and save the device map, load no weights."""
    sys.argv.insert(1, "mode=plan")
    main()


# --------------------------------------------------------------------------- summarize


@pipe_safe
def summarize_main(argv: list[str] | None = None) -> None:
    """``bigjob-summarize <sweep folder> [--plot]``: write summary.csv and summary.md (and summary.png), print the table."""
    from bigjob.job.summary import render_markdown, write_summary

    parser = argparse.ArgumentParser(prog="bigjob-summarize", description="Summarize a bigjob sweep folder.")
    parser.add_argument("sweep_dir", help="the folder a `bigjob -m ...` sweep wrote (holds one folder per job)")
    parser.add_argument("--plot", action="store_true",
                        help="also draw throughput and peak memory against the CPU budget, one line per setting of the other swept keys (needs matplotlib)")
    parser.add_argument("--plot-file", metavar="PNG", help="where --plot writes (default: <sweep folder>/summary.png)")
    args = parser.parse_args(argv)
    try:
        csv_path, md_path, rows = write_summary(args.sweep_dir)
        png_path = None
        if args.plot or args.plot_file:
            from bigjob.job.plot import plot_sweep

            png_path = plot_sweep(args.sweep_dir, args.plot_file)
    except BigJobError as err:
        fail(err)
        return
    print(render_markdown(rows), end="")
    print(f"\nwrote {csv_path} and {md_path}" + (f" and {png_path}" if png_path else ""))


@pipe_safe
def daemon_main(argv: list[str] | None = None) -> None:
    """``bigjob-daemon list|stop``: the warm-start daemons of ``runner.daemon=true`` (see docs/jobs.md)."""
    from bigjob.job.daemon import list_daemons, socket_dir, stop_daemons

    parser = argparse.ArgumentParser(prog="bigjob-daemon", description="List or stop the warm-start daemons of runner.daemon=true.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the running daemons: pid, age, idle timeout, what they preloaded")
    sub.add_parser("stop", help="stop them all (jobs they started run on to their end)")
    args = parser.parse_args(argv)
    try:
        folder = socket_dir()
    except BigJobError as err:
        fail(err)
        return
    if args.command == "list":
        daemons = list_daemons(folder)
        for info in daemons:
            age = time.time() - float(info.get("started", time.time()))
            print(f"pid {info['pid']}  up {age:.0f} s  idle exit {info.get('idle_s')} s  preloaded {', '.join(info.get('preload', []))}")
        print(f"{len(daemons)} daemon(s) in {folder}")
    else:
        stopped = stop_daemons(folder)
        print(f"stopped {len(stopped)} daemon(s)" + (f": {', '.join(map(str, stopped))}" if stopped else ""))
