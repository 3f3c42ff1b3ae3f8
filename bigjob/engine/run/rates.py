"""The speeds the execution cost model needs, declared or measured on this machine.

:class:`ExecutionRates` holds pinned host-to-device bandwidth, CPU and accelerator matmul
throughput and, optionally, disk read bandwidth; :meth:`ExecutionRates.from_mapping` reads
human values (``"12GB/s"``, ``"250G"``, ``2.5e11``). :func:`measure_rates` is the module's one
function with side effects: it allocates on the device and times copies and matmuls, once per
process and device.

>>> ExecutionRates.from_mapping({"h2d": "25GiB", "cpu_flops": "1.5 TFLOPS", "device_flops": 1e14}).cpu_flops
1500000000000.0
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bigjob.engine.plan.devices import CPU, normalize_device, parse_size
from bigjob.engine.tiers.pinned import pinned_empty
from bigjob.errors import BudgetError, ConfigError

__all__ = ["ExecutionRates", "measure_rates", "parse_bandwidth", "parse_flops"]

_FLOPS = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtTpP]?)\s*(?:flops?(?:/s)?)?\s*$", re.IGNORECASE)
_SI = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}


def _positive(value: float, key: str) -> float:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}={value!r} must be a finite number above 0")
    return float(value)


def parse_bandwidth(value: str | float, key: str) -> float:
    """Bytes per second from ``"12GB/s"``, ``"25GiB"`` (per second implied) or a number.

    >>> parse_bandwidth("12GB/s", "h2d"), parse_bandwidth(2.5e10, "h2d")
    (12000000000.0, 25000000000.0)
    """
    problem = f"cannot read {value!r} as a bandwidth for {key}; write bytes per second such as '12GB/s', '25GiB' or 1.2e10"
    text = value.strip().removesuffix("/s").removesuffix("/S") if isinstance(value, str) else value
    if isinstance(text, str) and "%" in text:  # a share of no capacity
        raise ConfigError(problem)
    try:
        nbytes = parse_size(text, key=key)
    except BudgetError:
        raise ConfigError(problem) from None
    return _positive(float(nbytes), key)


def parse_flops(value: str | float, key: str) -> float:
    """Operations per second from ``2.5e11``, ``"250G"``, ``"1.5 TFLOPS"``.

    >>> parse_flops("250G", "cpu_flops"), parse_flops("2.5e11", "cpu_flops")
    (250000000000.0, 250000000000.0)
    """
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"cannot read {value!r} as FLOP/s for {key}; write a number such as 2.5e11 or a string such as '250G'")
    if isinstance(value, str):
        match = _FLOPS.match(value)
        if not match:
            raise ConfigError(f"cannot read {value!r} as FLOP/s for {key}; write a number such as 2.5e11 or a string such as '250G' or '1.5TFLOPS'")
        number = float(match.group(1)) * _SI[match.group(2).lower()]
    else:
        number = float(value)
    return _positive(number, key)


# Short names (what a config writes) and the field names, both accepted by ExecutionRates.from_mapping.
_RATE_KEYS = {
    "h2d": "h2d_bytes_per_s",
    "h2d_bytes_per_s": "h2d_bytes_per_s",
    "cpu_flops": "cpu_flops",
    "device_flops": "device_flops",
    "disk": "disk_bytes_per_s",
    "disk_bytes_per_s": "disk_bytes_per_s",
}


@dataclass(frozen=True)
class ExecutionRates:
    """The speeds the cost model needs: pinned host-to-device bandwidth, CPU and device matmul throughput.

    >>> ExecutionRates.from_mapping({"h2d": "12GB/s", "cpu_flops": "250G", "device_flops": 5e13})
    ExecutionRates(h2d_bytes_per_s=12000000000.0, cpu_flops=250000000000.0, device_flops=50000000000000.0, disk_bytes_per_s=None)
    >>> ExecutionRates.from_mapping({"h2d": "fast", "cpu_flops": 1, "device_flops": 1})
    Traceback (most recent call last):
    ...
    bigjob.errors.ConfigError: cannot read 'fast' as a bandwidth for execution_rates.h2d; write bytes per second such as '12GB/s', '25GiB' or 1.2e10
    """

    h2d_bytes_per_s: float
    cpu_flops: float
    device_flops: float
    disk_bytes_per_s: float | None = None  # None: disk reads are not modelled (a warm page cache)

    def __post_init__(self) -> None:
        for name in ("h2d_bytes_per_s", "cpu_flops", "device_flops", "disk_bytes_per_s"):
            value = getattr(self, name)
            if value is None and name == "disk_bytes_per_s":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"ExecutionRates.{name}={value!r} is not a number; use from_mapping to read strings such as '12GB/s'")
            object.__setattr__(self, name, _positive(float(value), f"ExecutionRates.{name}"))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], key: str = "execution_rates") -> ExecutionRates:
        """Rates from human values; ``key`` names the argument or config key in errors. ``None`` values are unset."""
        if isinstance(values, ExecutionRates):
            return values
        if not isinstance(values, Mapping):
            raise ConfigError(f"{key}={values!r} is not a mapping; give {{'h2d': '12GB/s', 'cpu_flops': '250G', 'device_flops': '50T'}}")
        known = _RATE_KEYS
        unknown = [k for k in values if k not in known]
        if unknown:
            raise ConfigError(f"{key} has unknown keys {unknown}; use h2d, cpu_flops, device_flops and optionally disk")
        parsed: dict[str, float] = {}
        for name, value in values.items():
            if value is None:
                continue
            where = f"{key}.{name}"
            field_name = known[name]
            parsed[field_name] = parse_flops(value, where) if field_name.endswith("flops") else parse_bandwidth(value, where)
        missing = [short for short, full in (("h2d", "h2d_bytes_per_s"), ("cpu_flops", "cpu_flops"), ("device_flops", "device_flops")) if full not in parsed]
        if missing:
            raise ConfigError(f"{key} lacks {', '.join(missing)}; give h2d, cpu_flops and device_flops together, or none of them to measure them")
        return cls(**parsed)

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


# --------------------------------------------------------------------------- measurement (side effects)

_MEASURED: dict[tuple[str, torch.dtype], ExecutionRates] = {}
_MEASURE_LOCK = threading.Lock()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _best_seconds(step: Any, device: torch.device, repeats: int) -> float:
    step()  # warm-up: allocations, kernel selection
    _synchronize(device)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        step()
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return max(best, 1e-9)


def _copy_rate(device: torch.device, nbytes: int = 64 * 2**20, repeats: int = 3) -> float:
    """Bytes per second of one pinned host buffer copied to ``device`` (a RAM copy for the CPU)."""
    # Page-locked memory of its own: from PyTorch's pinned allocator it would stay cached (64 MiB
    # of resident RAM for the process's life) after this one measurement.
    source = pinned_empty(nbytes, pin=device.type == "cuda")
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _best_seconds(lambda: target.copy_(source, non_blocking=True), device, repeats)


def _matmul_rate(device: torch.device, dtype: torch.dtype, size: int, count: int, repeats: int = 3) -> float:
    """FLOP/s of ``count`` square ``size`` x ``size`` matmuls on ``device`` (2 * size**3 each)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)

    def step() -> None:
        for _ in range(count):
            torch.mm(a, b)

    return 2 * size**3 * count / _best_seconds(step, device, repeats)


def measure_rates(device: str | torch.device, dtype: torch.dtype = torch.float32) -> ExecutionRates:
    """Measure the rates of this machine for execution device ``device``; cached per process and (device, dtype).

    Pinned host-to-device copies of 64 MiB, 1024 x 1024 matmuls on the CPU and 2048 x 2048 on
    the device, best of 3 after a warm-up, synchronised. Not pure: it allocates and times. For
    ``"cpu"`` the "device" is the CPU (h2d is a RAM copy).

    >>> rates = measure_rates("cpu")
    >>> rates.h2d_bytes_per_s > 0 and rates.cpu_flops > 0 and rates is measure_rates("cpu")
    True
    """
    name = normalize_device(device, key="device")
    if name not in (CPU, "mps") and not name.startswith("cuda:"):
        raise ConfigError(f"cannot measure execution rates for device {name!r}; give an execution device such as 'cuda:0' or 'cpu'")
    key = (name, dtype)
    with _MEASURE_LOCK:
        cached = _MEASURED.get(key)
        if cached is not None:
            return cached
        target = torch.device(name)
        cpu_flops = _matmul_rate(torch.device(CPU), dtype, 1024, 1)
        device_flops = cpu_flops if target.type == CPU else _matmul_rate(target, dtype, 2048, 4)
        rates = ExecutionRates(_copy_rate(target), cpu_flops, device_flops)
        if target.type == "cuda":
            torch.cuda.empty_cache()  # give back the ~100 MiB of probes the caching allocator kept
        _MEASURED[key] = rates
        return rates
