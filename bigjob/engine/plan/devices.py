"""Device names, memory sizes and the memory each device can offer.

Canonical device names are ``"cuda:N"``, ``"mps"``, ``"cpu"`` and ``"disk"``. Users may
also write a GPU as an int ``N``, ``"N"``, ``"gpuN"`` or ``"cuda"`` (GPU 0).

>>> parse_size("1.5GB"), parse_size("512MiB"), parse_size(1024)
(1500000000, 536870912, 1024)
>>> normalize_device(0), normalize_device("gpu1"), normalize_device("CPU")
('cuda:0', 'cuda:1', 'cpu')
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import psutil
import torch

from bigjob.errors import BudgetError

__all__ = [
    "DISK",
    "CPU",
    "DeviceInfo",
    "device_inventory",
    "device_order",
    "format_size",
    "get_max_memory",
    "is_accelerator",
    "main_device",
    "normalize_device",
    "parse_size",
]

CPU = "cpu"
DISK = "disk"
# Disk without a budget: large enough never to bind, small enough for JSON and ints everywhere.
UNLIMITED = 2**62

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_GPU = re.compile(r"^(?:cuda:|gpu|)(\d+)$")


def parse_size(value: str | int | float, capacity: int | None = None, key: str = "max_memory") -> int:
    """Bytes from a size such as ``"10GiB"``, ``"800MB"``, ``4096`` or ``"90%"`` of ``capacity``.

    Decimal units (KB, MB, GB, TB) are powers of 10, binary ones (KiB, MiB, GiB, TiB)
    powers of 2. ``key`` names the argument or config key in error messages.

    >>> parse_size("90%", capacity=1000)
    900
    >>> parse_size("ten gigs")
    Traceback (most recent call last):
    ...
    bigjob.errors.BudgetError: cannot read 'ten gigs' as a size for max_memory; write bytes as an int or a number with a unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), or a percentage such as '90%'
    """
    if isinstance(value, bool):
        raise BudgetError(f"cannot read {value!r} as a size for {key}; write bytes as an int or a string such as '8GiB'")
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            raise BudgetError(f"size {value!r} for {key} is not finite; write a number of bytes or a string such as '8GiB'")
        if value < 0:
            raise BudgetError(f"size {value!r} for {key} is negative; a budget is at least 0 bytes")
        return int(value)
    if not isinstance(value, str):
        raise BudgetError(f"cannot read {value!r} ({type(value).__name__}) as a size for {key}; write an int or a string such as '8GiB'")
    text = value.strip()
    if text.startswith("-"):
        raise BudgetError(f"size {value!r} for {key} is negative; a budget is at least 0 bytes")
    percent = _PERCENT.match(text)
    if percent:
        share = float(percent.group(1))
        if capacity is None:
            raise BudgetError(
                f"size {value!r} for {key} is a percentage, but the device's capacity is unknown here; write an absolute size such as '8GiB'"
            )
        if share > 100:
            raise BudgetError(f"size {value!r} for {key} is more than 100% of the device")
        return int(capacity * share / 100)
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise BudgetError(
            f"cannot read {value!r} as a size for {key}; write bytes as an int or a number with a unit "
            "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), or a percentage such as '90%'"
        )
    nbytes = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(nbytes):
        raise BudgetError(f"size {value!r} for {key} is too large to be a number of bytes; write a size such as '8GiB'")
    return int(nbytes)


def format_size(nbytes: int) -> str:
    """A short human form of a byte count.

    >>> format_size(3 * 2**30), format_size(1536), format_size(2**62)
    ('3.00 GiB', '1.50 KiB', 'unlimited')
    """
    if nbytes >= UNLIMITED:
        return "unlimited"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes} B"


def normalize_device(device: str | int | torch.device, key: str = "max_memory") -> str:
    """The canonical name of a device written in any accepted form.

    >>> normalize_device("cuda"), normalize_device("3"), normalize_device(torch.device("cuda", 2))
    ('cuda:0', 'cuda:3', 'cuda:2')
    """
    if isinstance(device, torch.device):
        if device.type == "cuda":
            return f"cuda:{device.index or 0}"
        if device.type in (CPU, "mps", "meta"):
            return device.type
    if isinstance(device, bool):
        raise BudgetError(f"unknown device {device!r} in {key}; use a GPU index, 'cuda:N', 'gpuN', 'mps', 'cpu' or 'disk'")
    if isinstance(device, int):
        if device < 0:
            raise BudgetError(f"unknown device {device!r} in {key}; GPU indices start at 0")
        return f"cuda:{device}"
    if isinstance(device, str):
        name = device.strip().lower()
        if name in (CPU, DISK, "mps", "meta"):
            return name
        if name == "cuda":
            return "cuda:0"
        gpu = _GPU.match(name)
        if gpu:
            return f"cuda:{int(gpu.group(1))}"
    raise BudgetError(f"unknown device {device!r} in {key}; use a GPU index, 'cuda:N', 'gpuN', 'mps', 'cpu' or 'disk'")


def is_accelerator(device: str) -> bool:
    """Whether a canonical device name is a GPU-like device (``cuda:N`` or ``mps``)."""
    return device.startswith("cuda:") or device == "mps"


def device_order(device: str) -> tuple[int, int]:
    """Sort key putting GPUs first by index, then MPS, CPU and disk: the fastest devices first."""
    if device.startswith("cuda:"):
        return (0, int(device.split(":", 1)[1]))
    return ({"mps": 1, CPU: 2, DISK: 3}.get(device, 4), 0)


def main_device(budgets: Mapping[str, int]) -> str:
    """The device that runs the model under ``budgets`` (fastest first): the first accelerator with room, else CPU.

    >>> main_device({"cuda:0": 0, "cuda:1": 10, "cpu": 5}), main_device({"cpu": 5, "disk": 10})
    ('cuda:1', 'cpu')
    """
    for device, size in budgets.items():
        if is_accelerator(device) and size > 0:
            return device
    return CPU


@dataclass(frozen=True)
class DeviceInfo:
    """A device present on this machine and its memory in bytes."""

    device: str
    total_bytes: int
    free_bytes: int


def _detected() -> list[DeviceInfo]:
    found: list[DeviceInfo] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            found.append(DeviceInfo(f"cuda:{index}", int(total), int(free)))
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        total = psutil.virtual_memory().total
        allocated = torch.mps.driver_allocated_memory() if hasattr(torch, "mps") else 0
        found.append(DeviceInfo("mps", int(total), int(total - allocated)))
    memory = psutil.virtual_memory()
    found.append(DeviceInfo(CPU, int(memory.total), int(memory.available)))
    return found


def device_inventory() -> list[dict[str, object]]:
    """The devices of this machine as JSON-able records (name, total and free bytes).

    >>> any(entry["device"] == "cpu" for entry in device_inventory())
    True
    """
    return [asdict(info) for info in _detected()]


def get_max_memory(max_memory: Mapping[str | int, str | int] | None = None) -> dict[str, int]:
    """Budgets in bytes per canonical device: detected free memory, overridden per device by ``max_memory``.

    Devices the user names but this machine lacks are kept (a plan may be made for another
    machine's inventory; dispatching it here fails clearly). Disk is unlimited unless given;
    ``disk: 0`` forbids offloading to disk. Percentages are of the device's total memory.

    >>> budgets = get_max_memory({"cpu": "1GiB", "gpu0": "8GiB"})
    >>> budgets["cpu"], budgets["cuda:0"]
    (1073741824, 8589934592)
    """
    detected = {info.device: info for info in _detected()}
    budgets: dict[str, int] = {name: info.free_bytes for name, info in detected.items()}
    budgets[DISK] = UNLIMITED
    given: dict[str, str | int] = {}
    for raw_key, raw_value in (max_memory or {}).items():
        device = normalize_device(raw_key)
        if device in given:
            raise BudgetError(
                f"max_memory names {device} twice ({given[device]!r} and {raw_key!r}); keep one budget per device"
            )
        given[device] = raw_key
        if device == "meta":
            raise BudgetError("'meta' is not a device with memory; budget 'cuda:N', 'mps', 'cpu' or 'disk' in max_memory")
        capacity = detected[device].total_bytes if device in detected else None
        budgets[device] = parse_size(raw_value, capacity, key=f"max_memory.{raw_key}")
    if all(size == 0 for size in budgets.values()):
        raise BudgetError(f"every budget in max_memory is 0 ({dict(max_memory or {})}); give at least one device room")
    return dict(sorted(budgets.items(), key=lambda item: device_order(item[0])))
