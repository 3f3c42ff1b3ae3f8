"""Plan files: the device maps of a cache as one JSON file, to share read-only between machines.

The cache is a SQLite database (diskcache), and SQLite's locking is not reliable on network
filesystems (NFS, Lustre, GPFS...): a cache folder shared by the nodes of a cluster can be
corrupted. The safe set-up is a cache per node (``cache.dir`` on local disk) plus a plan
file on the shared filesystem, written once and read by every node::

    bigjob-cache export /shared/plans.json     # where the plans were made
    bigjob-cache import /shared/plans.json     # on each node, before its jobs

Nothing in a file is trusted because it is well-formed. :func:`import_plans` takes an entry
only when its key is recomputed from the inputs it lists (:func:`~bigjob.job.fingerprint.plan_key_of`),
it was planned by this planner version, its map names only devices its inputs gave a
budget, and its summary reads as a plan that keeps within its budgets. Only the known fields
are stored (as JSON: the cache holds no pickles), and an entry the cache already holds is
kept as it is. A job still checks a map against its model before loading anything. A
plan decides where weights go, never what they compute: the worst a forged map that passes
these checks can do is make a job slow or run out of memory, so keep the file writable by
you only (:func:`import_plans` warns about one that others may write).

>>> import tempfile
>>> from bigjob.job.cache import JobCache
>>> root = Path(tempfile.mkdtemp())
>>> with JobCache(root / "a") as cache:
...     export_plans(cache, root / "plans.json").exported
0
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bigjob.errors import BigJobError, CacheError
from bigjob.job.cache import JobCache, is_cache_key
from bigjob.job.fingerprint import FINGERPRINT_VERSION, plan_key_of

__all__ = ["FORMAT", "ExportResult", "ImportResult", "check_plan_entry", "export_plans", "import_plans"]

FORMAT = "bigjob-plans"
FORMAT_VERSION = 1
# The fields of a plan entry that are exported and imported; anything else is dropped.
_FIELDS = ("kind", "device_map", "summary", "inputs", "created")


@dataclass
class ExportResult:
    path: Path
    exported: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (key, reason): entries that would not import


@dataclass
class ImportResult:
    added: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)  # already in the cache: kept as they were
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    warnings: list[str] = field(default_factory=list)


def check_plan_entry(key: str, value: Any) -> str | None:
    """Why ``value`` cannot be trusted as the plan stored under ``key``, or None.

    >>> check_plan_entry("plan:" + "0" * 64, {"kind": "plan", "device_map": {"": "cpu"}, "inputs": {}})
    'the key does not match the inputs it lists (tampered with, or made by another bigjob)'
    """
    from bigjob.engine.plan.device_map import DeviceMap, PlanSummary
    from bigjob.engine.plan.devices import DISK, normalize_device
    from bigjob.engine.plan.planner import PLANNER_VERSION

    if not is_cache_key(key) or not key.startswith("plan:"):
        return "not a plan key ('plan:<sha256>')"
    if not isinstance(value, dict) or value.get("kind") != "plan":
        return "not a plan entry"
    inputs, device_map, summary = value.get("inputs"), value.get("device_map"), value.get("summary")
    if not isinstance(inputs, dict):
        return "no inputs to check the key against"
    if not isinstance(device_map, dict) or not device_map:
        return "no device_map"
    if key != "plan:" + plan_key_of(inputs):
        return "the key does not match the inputs it lists (tampered with, or made by another bigjob)"
    if inputs.get("planner_version") != PLANNER_VERSION:
        return f"planned by planner version {inputs.get('planner_version')!r}; this bigjob plans with {PLANNER_VERSION!r}"
    budgets = inputs.get("budgets")
    if not isinstance(budgets, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in budgets.values()):
        return "inputs.budgets is not a map of devices to bytes"
    try:
        dm = DeviceMap.from_json({"device_map": device_map, "plan": summary})
        budgeted = {normalize_device(d) for d, size in budgets.items() if size > 0}
    except (BigJobError, TypeError, ValueError) as err:
        return f"unreadable device map or summary ({str(err).splitlines()[0] if str(err) else type(err).__name__})"
    unbudgeted = sorted(set(dm.values()) - budgeted - {DISK})
    if unbudgeted:
        return f"the map uses {', '.join(unbudgeted)}, which its inputs give no budget"
    if dm.summary is not None:
        s: PlanSummary = dm.summary
        if s.strategy != inputs.get("strategy"):
            return f"the summary's strategy {s.strategy!r} is not the inputs' {inputs.get('strategy')!r}"
        over = [d for d, n in s.planned_bytes.items() if not isinstance(n, int) or n < 0 or n > int(s.budgets.get(d, 0))]
        if over:
            return f"the summary plans more than the budget on {', '.join(sorted(map(str, over)))}"
        placed = {normalize_device(d) for d, n in s.units.items() if isinstance(n, int) and n > 0}
        if placed != set(dm.values()):
            return f"the map uses {', '.join(sorted(set(dm.values())))} but its summary places units on {', '.join(sorted(placed))}"
    return None


def export_plans(cache: JobCache, path: str | os.PathLike[str]) -> ExportResult:
    """Writes every valid plan of ``cache`` to ``path`` (atomically; readable as your umask allows)."""
    plans: dict[str, dict[str, Any]] = {}
    skipped: list[tuple[str, str]] = []
    for key, value in cache.entries():
        if not key.startswith("plan:"):
            continue
        problem = check_plan_entry(key, value)
        if problem:
            skipped.append((key, problem))
            continue
        plans[key] = {f: value[f] for f in _FIELDS if f in value}
    from bigjob.engine.plan.planner import PLANNER_VERSION

    document = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint_version": FINGERPRINT_VERSION,
        "planner_version": PLANNER_VERSION,
        "created": time.time(),
        "plans": plans,
    }
    target = Path(path).expanduser()
    _write_shared(target, json.dumps(document, indent=1, sort_keys=True) + "\n")
    return ExportResult(target, len(plans), skipped)


def import_plans(cache: JobCache, path: str | os.PathLike[str]) -> ImportResult:
    """Adds the plans of a plan file to ``cache``, each one checked; raises CacheError for a file that is not one."""
    source = Path(path).expanduser()
    try:
        document = json.loads(source.read_text(encoding="utf-8"))
    except OSError as err:
        raise CacheError(f"cannot read the plan file {str(source)!r} ({err.strerror}); pass a file written by `bigjob-cache export`") from None
    except ValueError as err:
        raise CacheError(f"plan file {str(source)!r} is not JSON ({err}); pass a file written by `bigjob-cache export`") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CacheError(f"{str(source)!r} is not a bigjob plan file (no \"format\": \"{FORMAT}\"); pass a file written by `bigjob-cache export`")
    if document.get("version") != FORMAT_VERSION:
        raise CacheError(
            f"plan file {str(source)!r} has format version {document.get('version')!r}; this bigjob reads version {FORMAT_VERSION}: "
            "export it again with this version"
        )
    plans = document.get("plans")
    if not isinstance(plans, Mapping):
        raise CacheError(f"plan file {str(source)!r} has no \"plans\" object")
    result = ImportResult()
    mode = source.stat().st_mode
    if mode & 0o022:
        result.warnings.append(
            f"plan file {str(source)!r} may be written by others (mode {oct(mode & 0o777)}): whoever can write it decides where "
            "your jobs put their weights (never what they compute); keep it writable by you only"
        )
    for key, value in plans.items():
        problem = check_plan_entry(key, value)
        if problem:
            result.rejected.append((str(key), problem))
            continue
        if cache.get(key) is not None:
            result.present.append(key)
            continue
        entry = {f: value[f] for f in _FIELDS if f in value}
        entry["imported_from"] = str(source.absolute())
        cache.set(key, entry)
        result.added.append(key)
    return result


def _write_shared(path: Path, text: str) -> None:
    """Writes through a temporary sibling and a rename; created with the umask's mode (others may read it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise CacheError(f"cannot write the plan file {str(path)!r} ({err.strerror}); choose a writable path") from None
