"""How big a job cache grows during a sweep, with and without ``cache.max_size``.

The sweep runs the built-in demo model (fp32 checkpoint) in two dtypes at two CPU budgets:
each dtype's smaller budget builds an offload folder, its larger budget is served from it.
Each setting gets a fresh cache folder; a thread samples the folder's size every 20 ms.

    python benchmarks/cache_size.py [--limits none,350MB,300MB] [--sweep "dtype=bfloat16,float16 placement.max_memory.cpu=20MB,60MB"]

The table gives the peak and final size, the sweep's wall time and what the jobs' logs say
they removed. A limit below what one job uses at once (its demo checkpoint and offload
folder) cannot be met: those folders are kept, and the jobs warn.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bigjob import __version__
from bigjob.engine.plan.devices import format_size, parse_size


def folder_bytes(root: Path) -> int:
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass  # removed meanwhile
    return total


class Sampler(threading.Thread):
    def __init__(self, root: Path, period: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.root, self.period, self.peak = root, period, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.root))
            time.sleep(self.period)


def sweep(limit: str, overrides: list[str], scratch: Path) -> dict[str, object]:
    cache, work = scratch / f"cache-{limit}", scratch / f"work-{limit}"
    work.mkdir(parents=True)
    args = [sys.executable, "-m", "bigjob", "-m", "quiet=true", *overrides] + ([] if limit == "none" else [f"cache.max_size={limit}"])
    sampler = Sampler(cache)
    sampler.start()
    start = time.perf_counter()
    done = subprocess.run(args, cwd=work, env={**os.environ, "BIGJOB_CACHE_DIR": str(cache)}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
    logs = "".join(p.read_text() for p in work.rglob("*.log"))
    removed = sum(1 for line in logs.splitlines() if "least recently used folders" in line)
    kept = sum(1 for line in logs.splitlines() if "in use by running jobs" in line)
    return {"peak": max(sampler.peak, folder_bytes(cache)), "final": folder_bytes(cache), "wall": wall, "prunes": removed, "warnings": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limits", default="none,350MB,300MB", help="comma list of cache.max_size values; none: no limit")
    parser.add_argument("--sweep", default="dtype=bfloat16,float16 placement.max_memory.cpu=20MB,60MB", help="the sweep's overrides")
    args = parser.parse_args()
    overrides = shlex.split(args.sweep)
    print(f"# {' '.join(sys.argv)}")
    print(f"# bigjob {__version__}, Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs")
    print(f"# sweep: bigjob -m {' '.join(overrides)} [cache.max_size=...], a fresh cache folder each\n")
    print("| cache.max_size | peak cache size | final | wall s | prunes that removed folders | warnings: limit not met |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bigjob-cache-size-") as tmp:
        for limit in args.limits.split(","):
            row = sweep(limit, overrides, Path(tmp))
            label = limit if limit == "none" else f"{limit} ({format_size(parse_size(limit))})"
            print(f"| {label} | {format_size(row['peak'])} | {format_size(row['final'])} | {row['wall']:.1f} | {row['prunes']} | {row['warnings']} |")


if __name__ == "__main__":
    main()
