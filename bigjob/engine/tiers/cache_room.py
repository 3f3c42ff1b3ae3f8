"""How many bytes of file pages the page cache can really keep for this process.

A disk tier larger than that cannot stay cached: read through the cache, every forward
evicts the pages the next one needs (the sequential-scan thrash of an LRU). The read policy
(:mod:`bigjob.engine.run.read_policy`) keeps as many units cached as this room allows and
reads the rest past the cache. The room is the smaller of:

- the machine's: ``MemAvailable`` (free memory plus the page cache and slab the kernel can
  reclaim), from ``/proc/meminfo``;
- the memory cgroup's, where the process runs in one with a limit (v2 ``memory.max``, v1
  ``memory.limit_in_bytes``): the limit less what the cgroup uses besides its file pages.

``BIGJOB_PAGE_CACHE_BYTES`` (bytes, or a size such as ``6GiB``) replaces the measurement:
for a machine whose cache is shared with work the reading cannot see, and for tests.

>>> meminfo = "MemTotal: 1000 kB\\nMemAvailable: 600 kB\\n"
>>> page_cache_room(meminfo=meminfo, cgroup=None, environ={})
614400
>>> page_cache_room(meminfo=meminfo, cgroup=(400 * 1024, 100 * 1024), environ={})
307200
>>> page_cache_room(meminfo=meminfo, cgroup=None, environ={"BIGJOB_PAGE_CACHE_BYTES": "1KiB"})
1024
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from bigjob.engine.plan.devices import parse_size
from bigjob.errors import BudgetError, ConfigError

__all__ = ["ENV", "cgroup_memory", "page_cache_room"]

ENV = "BIGJOB_PAGE_CACHE_BYTES"
_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def _meminfo(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return out


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _stat(text: str | None) -> dict[str, int]:
    out = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def cgroup_memory(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: str | None = None) -> tuple[int, int] | None:
    """``(limit, bytes used besides file pages)`` of this process's memory cgroup; ``None`` without a limit.

    >>> cgroup_memory(Path("/nonexistent"), "0::/\\n") is None
    True
    """
    text = proc_cgroup if proc_cgroup is not None else _read(Path("/proc/self/cgroup")) or ""
    for line in text.splitlines():
        number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.lstrip("/")
        if number == "0" and controllers == "":  # v2: memory.max, memory.current, memory.stat's "file"
            folder = root / path
            limit = (_read(folder / "memory.max") or "").strip()
            if limit.isdigit():
                used = int((_read(folder / "memory.current") or "0").strip() or 0)
                return int(limit), max(used - _stat(_read(folder / "memory.stat")).get("file", 0), 0)
        elif "memory" in controllers.split(","):  # v1: the hierarchy's limit, usage less the page cache
            folder = root / "memory" / path
            stat = _stat(_read(folder / "memory.stat"))
            limit = stat.get("hierarchical_memory_limit") or int((_read(folder / "memory.limit_in_bytes") or "0").strip() or 0)
            if 0 < limit < _UNLIMITED:
                used = int((_read(folder / "memory.usage_in_bytes") or "0").strip() or 0)
                return limit, max(used - stat.get("total_cache", stat.get("cache", 0)), 0)
    return None


def page_cache_room(
    meminfo: str | None = None, cgroup: tuple[int, int] | None | bool = True, environ: Mapping[str, str] | None = None
) -> int:
    """Bytes of file pages the page cache can hold now (the pages it holds already included).

    ``meminfo``, ``cgroup`` (``(limit, used besides file pages)``, ``None`` for none, ``True``
    to read it) and ``environ`` replace what is read from the system.
    """
    env = os.environ if environ is None else environ
    forced = env.get(ENV)
    if forced:
        try:
            return max(parse_size(forced, key=ENV), 0)
        except BudgetError:
            raise ConfigError(f"environment variable {ENV}={forced!r} is not a size (write bytes or e.g. 6GiB)") from None
    info = _meminfo(meminfo if meminfo is not None else _read(Path("/proc/meminfo")) or "")
    room = info.get("MemAvailable", info.get("MemFree", 0) + info.get("Cached", 0))
    found = cgroup_memory() if cgroup is True else cgroup
    if found:
        limit, used = found
        room = min(room, max(limit - used, 0))
    return room
