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
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import bigjob
from bigjob.errors import BigJobError, ConfigError
from bigjob.job import schema  # noqa: F401  (registers the config schema)
from bigjob.job.callbacks import fail, launched_here
from bigjob.job.report import JobReport, read_report

__all__ = ["cache_main", "config_dir", "main", "plan_main", "summarize_main", "to_job_config"]

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


def to_job_config(cfg: DictConfig) -> schema.JobConfig:
    """The typed config; a missing mandatory value (``???``) becomes a ConfigError naming its key."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        keys = ", ".join(missing)
        raise ConfigError(f"{keys} has no value (???); set it on the command line, e.g. {missing[0]}=...")
    try:
        job = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    if not isinstance(job, schema.JobConfig):
        raise ConfigError("the config does not follow bigjob's schema; keep `bigjob_schema` first in the defaults list")
    return job


def _record_failure(run_dir: Path, cfg: DictConfig, err: BaseException) -> None:
    """Writes a failed ``metrics.json`` so sweep summaries list the job and its error."""
    if read_report(run_dir) is not None and read_report(run_dir).status == "completed":  # type: ignore[union-attr]
        return
    try:
        report = JobReport(status="failed", run_dir=str(run_dir), job_key="", mode=str(cfg.get("mode", "run")), error=str(err).splitlines()[0] if str(err) else type(err).__name__)
        report.write(run_dir)
    except OSError:
        pass  # an unwritable folder is the error being reported


def _print_plan(run_dir: Path) -> None:
    from bigjob.engine.plan.device_map import DeviceMap

    device_map = DeviceMap.from_json((run_dir / "device_map.json").read_text(encoding="utf-8"))
    print(device_map.describe())
    items = list(device_map.items())
    print("\ndevice map:")
    for name, device in items[:MAP_LINES_SHOWN]:
        print(f"  {name or '(whole model)'}: {device}")
    if len(items) > MAP_LINES_SHOWN:
        print(f"  ... {len(items) - MAP_LINES_SHOWN} more in {run_dir / 'device_map.json'}")


def _task(cfg: DictConfig) -> None:
    from bigjob.job.isolation import execute

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        report = execute(to_job_config(cfg), run_dir, multirun=multirun)  # in a child process with runner.isolate
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _interrupted(run_dir, cfg)
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
        _print_plan(run_dir)
    print(report.summary())


def _interrupted(run_dir: Path, cfg: DictConfig) -> None:
    """Ctrl-C: one line saying what is kept, a failed record for sweep summaries, exit code 130."""
    from bigjob.job.progress import PROGRESS_NAME

    try:
        done = int(json.loads((run_dir / PROGRESS_NAME).read_text(encoding="utf-8"))["batches_done"])
    except (OSError, ValueError, KeyError, TypeError):
        done = 0
    kept = f"{done} finished batch(es) are kept in {run_dir}" if done else f"no batch had finished; the record is in {run_dir}"
    _record_failure(run_dir, cfg, KeyboardInterrupt(f"interrupted (Ctrl-C) after {done} batch(es)"))
    sys.stderr.write(f"interrupted: {kept}; run the same command again to continue\n")
    sys.stderr.flush()
    sys.exit(130)


def _hydra_app() -> None:
    hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")(_task)()


def main() -> None:
    """``bigjob``: run a job (or a sweep with ``-m``) from the command line."""
    from bigjob.job.callbacks import sweep_failures

    _failed_jobs.clear()
    _hydra_app()
    # Jobs a launcher ran in other processes (joblib, Ray, submitit) are known by their records.
    for job_dir, error in sweep_failures():
        if job_dir not in _failed_jobs:
            sys.stderr.write(f"error: job {Path(job_dir).name} ({job_dir}): {error}\n")
            _failed_jobs.append(job_dir)
    if _failed_jobs:
        sys.stderr.write(f"error: {len(_failed_jobs)} job(s) of the sweep failed; see the summary in the sweep folder\n")
        sys.exit(1)


def plan_main() -> None:
    """``bigjob-plan``: plan only (``mode=plan``): print and save the device map, load no weights."""
    sys.argv.insert(1, "mode=plan")
    main()


def _pipe_safe(command: Callable[..., None]) -> Callable[..., None]:
    """A command whose reader may stop early (``bigjob-cache list | head``): ends quietly, exit code 0.

    Without this, Python prints a ``BrokenPipeError`` traceback, or an "Exception ignored"
    line when the pipe breaks at the final flush.
    """

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
            sys.stdout.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush must not fail again
            sys.exit(0)

    return run


# --------------------------------------------------------------------------- summarize


@_pipe_safe
def summarize_main(argv: list[str] | None = None) -> None:
    """``bigjob-summarize <sweep folder> [--plot]``: write summary.csv and summary.md (and summary.png), print the table."""
    from bigjob.job.summary import render_markdown, write_summary

    parser = argparse.ArgumentParser(prog="bigjob-summarize", description="Summarize a bigjob sweep folder.")
    parser.add_argument("sweep_dir", help="the folder a `bigjob -m ...` sweep wrote (holds one folder per job)")
    parser.add_argument("--plot", action="store_true",
                        help="also draw throughput and peak memory against the CPU budget, one line per batch size (needs matplotlib)")
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


# --------------------------------------------------------------------------- cache


def _format_entry(key: str, value: dict[str, Any]) -> str:
    from bigjob.engine.plan.devices import format_size

    kind = value.get("kind")
    if kind == "plan":
        inputs = value.get("inputs") or {}
        budgets = ", ".join(f"{d}={format_size(int(n))}" for d, n in (inputs.get("budgets") or {}).items())
        devices = sorted(set(value["device_map"].values()))
        return (
            f"{key}\n    model {inputs.get('model_class')} {json.dumps(inputs.get('model_kwargs', {}), sort_keys=True)}\n"
            f"    dtype {inputs.get('dtype') or 'checkpoint'}, strategy {inputs.get('strategy')}, budgets {budgets}\n"
            f"    tensors {inputs.get('tensors', {}).get('count')}, planner v{inputs.get('planner_version')}, map on {', '.join(devices)}"
        )
    if kind == "offload":
        path = Path(value["path"])
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0
        state = format_size(size) if path.is_dir() else "MISSING"
        return f"{key}\n    folder {path} ({state}), dtype {value.get('dtype') or 'checkpoint'}, {len(value.get('disk_modules', []))} disk modules"
    if kind == "working":
        return f"{key}\n    working memory {format_size(value['bytes'])} for {json.dumps(value.get('forward', {}), sort_keys=True)}"
    return f"{key}\n    run {value.get('run_dir')}"


def _plan_file_command(cache: Any, command: str, file: str) -> None:
    """``export FILE`` / ``import FILE``: exit code 1 when the file is unusable or an entry was rejected."""
    from bigjob.job.plan_file import export_plans, import_plans

    try:
        if command == "export":
            exported = export_plans(cache, file)
            for key, reason in exported.skipped:
                print(f"skipped {key}: {reason}")
            print(f"exported {exported.exported} plans to {exported.path}")
            return
        imported = import_plans(cache, file)
    except BigJobError as err:
        fail(err)
        return
    for warning in imported.warnings:
        sys.stderr.write(f"warning: {warning}\n")
    for key, reason in imported.rejected:
        sys.stderr.write(f"rejected {key}: {reason}\n")
    print(f"imported {len(imported.added)} plans into {cache.root} ({len(imported.present)} already there, {len(imported.rejected)} rejected)")
    if imported.rejected:
        sys.exit(1)


def _age(seconds: float) -> str:
    """How long ago, in the unit that reads best.

    >>> _age(42), _age(600), _age(9000), _age(3 * 86400)
    ('42 s', '10 min', '2.5 h', '3.0 d')
    """
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _prune_command(cache: Any, max_size: str | None, older_than: str | None, dry_run: bool) -> None:
    """``prune``: one line per folder removed or kept; exit code 1 when a folder could not be removed."""
    from bigjob.engine.plan.devices import format_size, parse_size
    from bigjob.job.prune import parse_age, prune

    try:
        limit = None if max_size is None else parse_size(max_size, key="--max-size")
        age = None if older_than is None else parse_age(older_than)
        result = prune(cache, max_size=limit, older_than=age, dry_run=dry_run)
    except BigJobError as err:
        fail(err)
        return
    now = time.time()

    def line(verb: str, artifact: Any, why: str = "") -> str:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(artifact.last_used))
        return f"{verb:<14} {artifact.kind:<10} {artifact.path.name[:24]:<24} {format_size(artifact.size):>10}  last used {used} ({_age(now - artifact.last_used)} ago){why}"

    for artifact in result.removed:
        print(line("would remove" if dry_run else "removed", artifact))
    for artifact in result.in_use:
        print(line("kept", artifact, ": in use by a running job"))
    for artifact, error in result.failed:
        print(line("not removed", artifact, f": {error}"))
    verb = "would free" if dry_run else "freed"
    print(
        f"{'dry run: ' if dry_run else ''}{len(result.removed)} folders {'to remove' if dry_run else 'removed'} from {cache.root}, "
        f"{verb} {format_size(result.freed)}, {result.entries_removed} registry entries removed; "
        f"{format_size(result.size_after)} {'would be ' if dry_run else ''}left"
    )
    if limit is not None and result.size_after > limit:
        print(
            f"note: more than --max-size {max_size} ({format_size(limit)}) is left: "
            + (f"{len(result.in_use)} folders are in use by running jobs" if result.in_use else "plans, entries and locks only (`clear` removes them)")
        )
    if result.failed:
        sys.exit(1)


def _print_kept(kept: list[Any]) -> None:
    for artifact in kept:
        print(f"kept {artifact.kind} {artifact.path}: in use by a running job (clear again when it has ended)")


@_pipe_safe
def cache_main(argv: list[str] | None = None) -> None:
    """``bigjob-cache [--dir D] list|info|clear|verify|prune|export FILE|import FILE``."""
    from bigjob.engine.plan.devices import format_size
    from bigjob.job.cache import JobCache
    from bigjob.job.cache_db import remove_database
    from bigjob.job.cache_folder import default_cache_dir

    parser = argparse.ArgumentParser(prog="bigjob-cache", description="Inspect and maintain bigjob's plan and offload cache.")
    parser.add_argument("--dir", help="the cache folder (default: cache.dir's default, $BIGJOB_CACHE_DIR or ~/.cache/bigjob)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every entry with the inputs of its key")
    sub.add_parser("info", help="where the cache is and how big")
    sub.add_parser("clear", help="remove every entry, offload folder and demo checkpoint (not those a running job uses)")
    sub.add_parser("verify", help="drop corrupt entries and entries whose folder is gone")
    prune = sub.add_parser(
        "prune", help="remove the least recently used offload folders and demo checkpoints (never those a running job uses)"
    )
    prune.add_argument("--max-size", help="remove until the cache folder fits this size, e.g. 50GB or 200GiB")
    prune.add_argument("--older-than", help="remove what no job used for this long, e.g. 14d, 12h, 30m")
    prune.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    sub.add_parser("export", help="write every plan to a JSON file (to share read-only with other nodes)").add_argument("file")
    sub.add_parser("import", help="add the plans of a file written by `export`, each one checked").add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "prune" and args.max_size is None and args.older_than is None:
        parser.error("prune needs --max-size (e.g. 50GB) or --older-than (e.g. 14d), or both")
    root = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    if not root.exists() and args.command != "import":
        print(f"no cache at {root}")
        return
    try:
        cache = JobCache(root)
    except BigJobError as err:
        if args.command == "clear" and (root / "db").is_dir():  # the fix a broken database's message asks for
            from bigjob.job.prune import remove_unused_folders

            try:
                remove_database(root)
                kept = remove_unused_folders(root)
            except BigJobError as refused:  # another user's folder, or one open to others
                fail(refused)
                return
            print(f"the cache database could not be opened ({err}); removed it and the offload and checkpoint folders from {root}")
            _print_kept(kept)
            return
        fail(err)
        return
    with cache:
        if args.command in ("export", "import"):
            _plan_file_command(cache, args.command, args.file)
            return
        if args.command == "prune":
            _prune_command(cache, args.max_size, args.older_than, args.dry_run)
            return
        if args.command == "list":
            entries = list(cache.entries())
            for key, value in entries:
                print(_format_entry(key, value))
            print(f"{len(entries)} entries in {root}")
        elif args.command == "info":
            counts: dict[str, int] = {}
            for key in cache.keys():
                kind = key.split(":", 1)[0]
                if kind != "lock":
                    counts[kind] = counts.get(kind, 0) + 1
            from bigjob.job.prune import artifacts

            found = artifacts(cache)  # least recently used first
            print(f"cache folder  {root} (mode {oct(root.stat().st_mode & 0o777)})")
            print(f"entries       {', '.join(f'{k} {n}' for k, n in sorted(counts.items())) or 'none'}")
            for kind, label in (("offload", "offload      "), ("checkpoint", "checkpoints  ")):
                group = [a for a in found if a.kind == kind]
                line = f"{label} {len(group)}"
                if group:
                    ages = [time.time() - a.last_used for a in group]
                    line += (f", {format_size(sum(a.size for a in group))}, last used {_age(min(ages))} to {_age(max(ages))} ago: "
                             + ", ".join(a.path.name[:16] for a in group))
                print(line)
            print(f"size on disk  {format_size(cache.volume())}")
        elif args.command == "clear":
            from bigjob.job.prune import clear

            try:
                count, kept = clear(cache)
            except BigJobError as err:
                fail(err)
                return
            print(f"removed {count} entries and the offload and checkpoint folders from {root}")
            _print_kept(kept)
        else:
            dropped = cache.verify()
            for key, reason in dropped:
                print(f"dropped {key}: {reason}")
            known = {Path(v["path"]).parent for k, v in cache.entries() if k.startswith("offload:")}  # entries name the folder inside
            orphans = [p for p in cache.offload_root.iterdir() if p not in known] if cache.offload_root.is_dir() else []
            for path in orphans:
                print(f"note: offload folder {path} has no entry (a job may be building it, or it is left over; `prune` or `clear` removes it)")
            print(f"verified {root}: {len(dropped)} entries dropped")


@_pipe_safe
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
