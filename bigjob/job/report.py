"""The run record: a typed :class:`JobReport`, written atomically as ``metrics.json``.

Also the measurements that go into it: a background :class:`MemorySampler` (peak RSS and
peak anonymous memory, i.e. memory the process owns rather than file pages it maps), CUDA
peaks per device, latency percentiles, versions.

>>> report = JobReport(status="completed", run_dir="/tmp/r", job_key="k", mode="run")
>>> JobReport.from_json(report.to_json()) == report
True
>>> percentile([1.0, 2.0, 3.0, 4.0], 50)
2.5
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

__all__ = [
    "JobReport",
    "MemorySampler",
    "atomic_write_text",
    "cuda_peaks",
    "percentile",
    "read_report",
    "versions",
]

METRICS_NAME = "metrics.json"
DEVICE_MAP_NAME = "device_map.json"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling and a rename: all or nothing."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation, or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _rss_anon() -> int | None:
    """RssAnon of this process in bytes (Linux), or None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class MemorySampler:
    """Samples RSS and anonymous RSS every ``interval`` seconds in a thread; keeps the peaks."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon: int | None = None
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bigjob-memory", daemon=True)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
        anon = _rss_anon()
        if anon is not None:
            self.peak_anon = max(self.peak_anon or 0, anon)

    def reset(self) -> None:
        """Forget the peaks so far; the next ones start from the current use."""
        self.peak_rss, self.peak_anon = 0, None
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def cuda_peaks() -> dict[str, int]:
    """Peak bytes allocated by torch on each CUDA device since the last reset ({} without CUDA)."""
    import torch  # here: the CLI's --help and the summaries read records without torch

    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count())}


def versions() -> dict[str, str]:
    """Versions of python, torch and bigjob, and the platform."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            bigjob_version = version("bigjob")
        except PackageNotFoundError:
            bigjob_version = "unknown (not installed)"
    except ImportError:  # pragma: no cover
        bigjob_version = "unknown"
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bigjob": bigjob_version,
        "platform": platform.platform(),
    }


@dataclass
class JobReport:
    """Everything a job measured and decided; ``metrics.json`` is this as JSON."""

    status: str  # completed | planned | failed
    run_dir: str
    job_key: str
    mode: str
    task: str | None = None
    model_class: str | None = None
    error: str | None = None
    plan_key: str | None = None
    plan_seconds: float | None = None
    plan_cache_hit: bool | None = None
    offload_folder: str | None = None
    offload_cache_hit: bool | None = None
    offload_compression: str = "none"  # how the streamed tiers' Linear weights were stored (placement.offload_compression)
    load_seconds: float | None = None
    first_batch_seconds: float | None = None  # job start to the first batch written (this session's first)
    main_device: str | None = None
    bytes_per_tier: dict[str, int] = field(default_factory=dict)
    # Disk-tier units run on the CPU, by how their bytes came: "mapped" (page cache) or "direct"
    # (read past it into reused buffers: placement.disk_reads).
    disk_unit_reads: dict[str, int] = field(default_factory=dict)
    planned_bytes: dict[str, int] = field(default_factory=dict)
    budgets: dict[str, int] = field(default_factory=dict)  # what the planner capped each device at (balanced: below the user's)
    user_budgets: dict[str, int] = field(default_factory=dict)  # placement.max_memory as resolved (unset: free memory)
    working_memory_bytes: int = 0  # kept free of weights on main_device for the forward (placement.working_memory)
    batches: int = 0
    samples: int = 0
    tokens: int = 0
    resumed_from_batch: int = 0
    batch_latency_p50_s: float | None = None
    batch_latency_p90_s: float | None = None
    samples_per_s: float | None = None
    tokens_per_s: float | None = None
    # Figures only some tasks have, e.g. generate: prefill_tokens_per_s, decode_tokens_per_s, new_tokens.
    task_metrics: dict[str, Any] = field(default_factory=dict)
    peak_rss_bytes: int | None = None
    peak_anon_bytes: int | None = None
    # At the job's start: in a sweep, jobs share a process, so earlier jobs' memory shows here.
    start_rss_bytes: int | None = None
    start_anon_bytes: int | None = None
    peak_cuda_allocated_bytes: dict[str, int] = field(default_factory=dict)
    wall_seconds: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    outputs: dict[str, str] = field(default_factory=dict)
    reused_from: str | None = None  # a sweep job skipped because this completed run matched
    checkpoint: dict[str, Any] = field(default_factory=dict)
    devices: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    # Where the work ran: host, process and the process that started it (a launcher's worker
    # when isolated); isolated: in a fresh child process of its own (runner.isolate).
    host: str | None = None
    pid: int | None = None
    parent_pid: int | None = None
    isolated: bool = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> JobReport:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def write(self, run_dir: str | os.PathLike[str] | None = None) -> Path:
        """Writes ``metrics.json`` atomically into ``run_dir`` (default: the report's own)."""
        path = Path(run_dir or self.run_dir) / METRICS_NAME
        atomic_write_text(path, self.to_json() + "\n")
        return path

    def summary(self) -> str:
        """A few lines for a terminal: where the weights went, times, cache hits, outputs."""
        from bigjob.engine.plan.devices import format_size

        def secs(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        def hit(value: bool | None) -> str:
            return {True: "cache hit", False: "computed", None: "not cached"}[value]

        lines = [f"bigjob {self.status}: {self.mode} {self.task or ''} {self.model_class or ''}".rstrip()]
        if self.error:
            lines.append(f"  error     {self.error}")
        tiers = self.bytes_per_tier or self.planned_bytes
        if tiers:
            where = ", ".join(f"{dev} {format_size(n)}" for dev, n in tiers.items() if n)
            lines.append(f"  weights   {where}" + (f"  (runs on {self.main_device})" if self.main_device else ""))
        if self.working_memory_bytes:
            lines.append(f"  forward   {format_size(self.working_memory_bytes)} kept free on {self.main_device} (placement.working_memory)")
        if self.plan_seconds is not None:
            lines.append(f"  plan      {secs(self.plan_seconds)} ({hit(self.plan_cache_hit)})")
        if self.status == "completed" and self.mode == "run":
            if self.offload_folder:
                state = "reused" if self.offload_cache_hit else "built"
                lines.append(f"  offload   {state} {self.offload_folder}")
            if self.offload_compression != "none":
                lines.append(f"  compress  {self.offload_compression} (weights of the tiers that stream; placement.offload_compression)")
            lines.append(f"  load      {secs(self.load_seconds)}")
            resumed = f", resumed after batch {self.resumed_from_batch}" if self.resumed_from_batch else ""
            lines.append(
                f"  batches   {self.batches} ({self.samples} samples, {self.tokens} tokens{resumed}); "
                f"latency p50 {secs(self.batch_latency_p50_s)}, p90 {secs(self.batch_latency_p90_s)}"
            )
            if self.samples_per_s is not None and self.tokens_per_s is not None:
                lines.append(f"  speed     {self.samples_per_s:.1f} samples/s, {self.tokens_per_s:.0f} tokens/s")
            prefill, decode = self.task_metrics.get("prefill_tokens_per_s"), self.task_metrics.get("decode_tokens_per_s")
            if prefill is not None:
                rate = f", decode {decode:.0f} tokens/s" if decode is not None else ""
                lines.append(f"  generate  {self.task_metrics.get('new_tokens')} new tokens; prefill {prefill:.0f} tokens/s{rate}")
        if self.peak_rss_bytes:
            anon = f", anonymous {format_size(self.peak_anon_bytes)}" if self.peak_anon_bytes else ""
            start = f" (at start {format_size(self.start_anon_bytes)})" if self.start_anon_bytes else ""
            lines.append(f"  memory    peak RSS {format_size(self.peak_rss_bytes)}{anon}{start}")
        if self.reused_from:
            lines.append(f"  skipped   already completed in {self.reused_from}")
        for name, path in self.outputs.items():
            lines.append(f"  {name:<9} {path}")
        return "\n".join(lines)


def read_report(run_dir: str | os.PathLike[str]) -> JobReport | None:
    """The report in ``run_dir/metrics.json``, or None when absent or unreadable."""
    try:
        return JobReport.from_json((Path(run_dir) / METRICS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return None
