"""``bigjob-cache [--dir D] list|info|clear|verify|prune|export FILE|import FILE``: the plan and offload cache."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from bigjob.console import bigjob_version, pipe_safe
from bigjob.errors import BigJobError
from bigjob.job.callbacks import fail

__all__ = ["cache_main"]



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


def _verify_command(cache: Any) -> None:
    """``verify``: one line per entry dropped and per damaged offload folder; exit code 1 when one had to be kept."""
    from bigjob.job.verify import verify

    try:
        result = verify(cache)
    except BigJobError as err:
        fail(err)
        return
    for key, reason in result.dropped:
        print(f"dropped {key}: {reason}")
    for folder in result.damaged:
        state = "removed" if folder.removed else f"kept ({folder.kept_because}; verify again when it has ended)"
        print(f"damaged offload folder {folder.path}: {'; '.join(folder.problems)}; {state}")
    for path in result.orphans:
        print(f"note: offload folder {path} has no entry (a job may be building it, or it is left over; `prune` or `clear` removes it)")
    removed = sum(1 for folder in result.damaged if folder.removed)
    print(f"verified {cache.root}: {len(result.dropped)} entries dropped, {removed} damaged offload folders removed"
          + (f", {len(result.kept)} kept" if result.kept else ""))
    if result.kept:
        sys.exit(1)


def _print_kept(kept: list[Any]) -> None:
    for artifact in kept:
        print(f"kept {artifact.kind} {artifact.path}: in use by a running job (clear again when it has ended)")


@pipe_safe
def cache_main(argv: list[str] | None = None) -> None:
    """``bigjob-cache [--dir D] list|info|clear|verify|prune|export FILE|import FILE``."""
    parser = argparse.ArgumentParser(
        prog="bigjob-cache", description="Inspect and maintain bigjob's plan and offload cache.",
        epilog="The cache folder is --dir, else $BIGJOB_CACHE_DIR, else $XDG_CACHE_HOME/bigjob, else ~/.cache/bigjob "
               "(the folder jobs use when cache.dir is null; `info` prints it).",
    )
    parser.add_argument("--version", action="version", version=f"bigjob-cache {bigjob_version()}")
    parser.add_argument("--dir", help="the cache folder (default: $BIGJOB_CACHE_DIR, else $XDG_CACHE_HOME/bigjob, else ~/.cache/bigjob)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="every entry with the inputs of its key")
    sub.add_parser("info", help="where the cache is and how big")
    sub.add_parser("clear", help="remove every entry, offload folder and demo checkpoint (not those a running job uses)")
    sub.add_parser("verify", help="check every entry and every byte of every offload folder; drop what is damaged (a job rebuilds it)")
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
    from bigjob.engine.plan.devices import format_size  # after parsing: --help and --version do not wait for torch
    from bigjob.job.cache import JobCache
    from bigjob.job.cache_db import remove_database
    from bigjob.job.cache_folder import default_cache_dir

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
            _verify_command(cache)
