"""Leak soak: a long job under a disk-offload budget, watching for memory and file-descriptor leaks.

Runs one job in this process (the demo model by default: 54M parameters with a 150 MiB CPU
budget, so about a third of the weights is read from disk on every batch) while a thread
samples, every ``--interval`` seconds, the batches done (from the run's ``progress.json``),
anonymous memory (``RssAnon``: what the process owns, without the page cache of mapped
checkpoint files), RSS and the open file descriptors (``/proc/self/fd``). It prints the
least-squares slope of anonymous memory per batch after the warm-up and the descriptor
counts at the start and end of the batch loop.

    python benchmarks/leak_soak.py                      # 500 batches of the demo model
    python benchmarks/leak_soak.py --tiny --batches 60 --every-batch --json soak.json
    python benchmarks/leak_soak.py placement.max_memory.cpu=100MiB    # any job override

``--self-check-leak-kib N`` keeps N KiB more per batch alive, to show that the measurement
sees a leak of that size (the slope then rises by about N KiB per batch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

TINY = ["model=demo_tiny", "placement.max_memory.cpu=100KiB"]  # the 169 KiB tiny model, ~40% of it on disk


def read_status() -> tuple[int, int]:
    """(RssAnon, VmRSS) of this process in bytes."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                values[key] = int(rest.split()[0]) * 1024
    return values["RssAnon"], values["VmRSS"]


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # without the descriptor listdir itself holds


class Sampler(threading.Thread):
    """Every ``interval`` s: (seconds, batches done, RssAnon, RSS, open fds)."""

    def __init__(self, progress: Path, interval: float) -> None:
        super().__init__(name="soak-sampler", daemon=True)
        self.progress, self.interval = progress, interval
        self.samples: list[tuple[float, int, int, int, int]] = []
        self._done = threading.Event()
        self._start = time.perf_counter()

    def batches_done(self) -> int:
        try:
            return int(json.loads(self.progress.read_text())["batches_done"])
        except (OSError, ValueError, KeyError):
            return -1  # before the first batch (or mid-rename)

    def sample(self) -> None:
        anon, rss = read_status()
        self.samples.append((time.perf_counter() - self._start, self.batches_done(), anon, rss, open_fds()))

    def run(self) -> None:
        while not self._done.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx if sxx else 0.0


def analyse(samples: list[tuple[float, int, int, int, int]], batches: int, warmup: int) -> dict:
    """Slope of RssAnon per batch over the samples taken in the batch loop after ``warmup`` batches."""
    window = [s for s in samples if warmup <= s[1] < batches]
    if len(window) < 5 or window[-1][1] - window[0][1] < max(5, (batches - warmup) // 2):
        raise SystemExit(f"only {len(window)} samples after the warm-up; lower --interval or raise --batches")
    return {
        "samples": len(window),
        "window_batches": [window[0][1], window[-1][1]],
        "anon_slope_bytes_per_batch": slope([(s[1], s[2]) for s in window]),
        "rss_slope_bytes_per_batch": slope([(s[1], s[3]) for s in window]),
        "anon_start_bytes": window[0][2],
        "anon_end_bytes": window[-1][2],
        "anon_max_bytes": max(s[2] for s in window),
        "fds_start": window[0][4],
        "fds_end": window[-1][4],
        "fds_max": max(s[4] for s in window),
        # Writes hold a descriptor for a moment, so a sample may catch one: a leak shows as a
        # rising floor, the lowest count early against the lowest late in the loop.
        "fds_first_third_min": min(s[4] for s in window[: max(1, len(window) // 3)]),
        "fds_last_third_min": min(s[4] for s in window[-max(1, len(window) // 3) :]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--every-batch", action="store_true", help="sample after every batch instead (short runs)")
    parser.add_argument("--warmup", type=int, default=None, help="batches left out of the slope (default: a tenth, at least 5)")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo model (a few seconds) instead of the 54M one")
    parser.add_argument("--cache", help="cache folder (default: the usual one, so the demo checkpoint is made once)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--self-check-leak-kib", type=int, default=0, help="keep this much more memory per batch")
    parser.add_argument("overrides", nargs="*", help="job config overrides, as on the bigjob command line")
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir

    from bigjob.cli import config_dir, to_job_config
    from bigjob.job import progress
    from bigjob.job.runner import run_job

    warmup = args.warmup if args.warmup is not None else max(5, args.batches // 10)
    overrides = [
        *(TINY if args.tiny else []),
        f"data.num_samples={args.batches * args.batch_size}",
        f"data.batch_size={args.batch_size}",
        "quiet=true",
        *([f"cache.dir={args.cache}"] if args.cache else []),
        *args.overrides,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = to_job_config(compose("config", overrides=overrides))
    if args.self_check_leak_kib:
        kept: list[torch.Tensor] = []
        append = progress.ResultWriter.append

        def leaky_append(self, *a, **k):  # type: ignore[no-untyped-def]
            kept.append(torch.ones(args.self_check_leak_kib * 256))  # float32: N KiB, every page touched
            return append(self, *a, **k)

        progress.ResultWriter.append = leaky_append  # type: ignore[method-assign]
    sampler: Sampler | None = None
    if args.every_batch:
        recorded = progress.ResultWriter.append

        def sampled_append(self, *a, **k):  # type: ignore[no-untyped-def]
            recorded(self, *a, **k)
            sampler.sample()  # type: ignore[union-attr]

        progress.ResultWriter.append = sampled_append  # type: ignore[method-assign]

    with tempfile.TemporaryDirectory(prefix="bigjob-soak-") as tmp:
        run_dir = Path(tmp) / "run"
        fds_before = open_fds()
        sampler = Sampler(run_dir / "progress.json", args.interval)
        sampler.sample()
        if not args.every_batch:
            sampler.start()
        started = time.perf_counter()
        report = run_job(cfg, run_dir)
        seconds = time.perf_counter() - started
        if not args.every_batch:
            sampler.stop()
        fds_after = open_fds()
    figures = analyse(sampler.samples, args.batches, warmup)
    figures.update(
        batches=report.batches, seconds=seconds, warmup_batches=warmup, fds_before_job=fds_before, fds_after_job=fds_after,
        bytes_per_tier=report.bytes_per_tier, peak_anon_bytes=report.peak_anon_bytes, batch_latency_p50_s=report.batch_latency_p50_s,
        self_check_leak_kib=args.self_check_leak_kib,
    )

    print(f"# {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}")
    print(f"# torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}")
    print(f"# job: {report.model_class}, {report.batches} batches of {args.batch_size}, weights per tier {report.bytes_per_tier}")
    print()
    print("| figure | value |")
    print("|---|---|")
    print(f"| wall time | {seconds:.1f} s ({report.batches / seconds:.2f} batches/s) |")
    print(f"| samples after warm-up ({warmup} batches) | {figures['samples']} (batches {figures['window_batches'][0]}..{figures['window_batches'][1]}) |")
    print(f"| RssAnon slope | {figures['anon_slope_bytes_per_batch']:+.0f} bytes/batch |")
    print(f"| RSS slope | {figures['rss_slope_bytes_per_batch']:+.0f} bytes/batch |")
    print(f"| RssAnon start / end / max | {figures['anon_start_bytes'] / 2**20:.1f} / {figures['anon_end_bytes'] / 2**20:.1f} / {figures['anon_max_bytes'] / 2**20:.1f} MiB |")
    print(f"| open fds start / end / max (batch loop) | {figures['fds_start']} / {figures['fds_end']} / {figures['fds_max']} |")
    print(f"| open fds, lowest in the first / last third | {figures['fds_first_third_min']} / {figures['fds_last_third_min']} |")
    print(f"| open fds before / after the job | {fds_before} / {fds_after} |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
